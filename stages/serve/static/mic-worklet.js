// Audio thread: mono-mix the microphone and box-filter it down to 16 kHz; post ~10 ms blocks.
class Mic16k extends AudioWorkletProcessor {
  constructor() { super(); this.step = sampleRate / 16000; this.pos = 0; this.acc = 0; this.n = 0; this.out = []; }
  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      for (let i = 0; i < input[0].length; i++) {
        let x = 0;
        for (const ch of input) x += ch[i];
        this.acc += x / input.length; this.n += 1; this.pos += 1;
        if (this.pos >= this.step) { this.pos -= this.step; this.out.push(this.acc / this.n); this.acc = 0; this.n = 0; }
      }
      if (this.out.length >= 160) { this.port.postMessage(Float32Array.from(this.out)); this.out = []; }
    }
    return true;
  }
}
registerProcessor('mic-16k', Mic16k);
