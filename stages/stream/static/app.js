const $ = id => document.getElementById(id);
const SR = 16000, LEAD = Number(document.body.dataset.lead), SEND = 1600;   // 16 kHz; s of audio scheduling lead; 100 ms posts
const note = text => { $('note').textContent = text; };

// one AudioContext plays the stream and records the microphone; browsers start it suspended
// until a user gesture
let ctx = null, playAt = 0;
function audio() {
  if (!ctx) ctx = new AudioContext();
  if (ctx.state === 'suspended') ctx.resume();
  return ctx;
}
for (const t of ['pointerdown', 'keydown']) document.addEventListener(t, () => { audio(); if ($('note').textContent.startsWith('click')) note(''); });

function play(b64) {
  const a = audio();
  if (a.state !== 'running') { note('click the page to hear the sound'); return; }
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer);
  const buf = a.createBuffer(1, pcm.length, SR);
  const ch = buf.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  if (playAt < a.currentTime) playAt = a.currentTime + LEAD;   // start, or restart after a gap
  if (playAt > a.currentTime + 1.0) return;                   // too far behind: skip to catch up
  const src = a.createBufferSource();
  src.buffer = buf; src.connect(a.destination); src.start(playAt);
  playAt += buf.duration;
}

function showStats(s) {
  const all = Object.assign({}, s.stream, s.server);
  const fmt = v => typeof v === 'number' && !Number.isInteger(v) ? v.toFixed(2) : String(v);
  $('stats').textContent = Object.entries(all).map(([k, v]) => k + ' ' + fmt(v)).join(' \u00b7 ');
}

const events = new EventSource('/events');
events.addEventListener('audio', e => play(e.data));
events.addEventListener('stats', e => showStats(JSON.parse(e.data)));

// the text box: an instruction, or with "say" ticked, speech the server synthesizes (espeak-ng) and the
// character says, heard like push-to-talk audio
$('say').addEventListener('submit', async e => {
  e.preventDefault();
  const text = $('text').value.trim(), speak = $('speak').checked;
  if (!text) return;
  try {
    const r = await fetch(speak ? '/say' : '/instruction', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                          body: JSON.stringify({text})});
    if (r.ok) { $('text').value = ''; note((speak ? 'saying: ' : 'sent: ') + text); } else note((await r.json()).error);
  } catch (err) { note((speak ? 'not said: ' : 'not sent: ') + err); }
});

// push-to-talk: the microphone is opened per press, so the browser's recording indicator
// means "talking"; 16 kHz float32 is posted in order, ~100 ms per request
let talking = false, press = 0, mic = null, worklet = null, held = [], heldN = 0, sending = Promise.resolve();
function send(samples) {
  sending = sending.then(() => fetch('/audio', {method: 'POST', headers: {'Content-Type': 'application/octet-stream'},
                                                  body: samples.buffer}))
                   .then(r => { if (!r.ok) note('audio rejected: ' + r.status); })
                   .catch(err => note('audio not sent: ' + err));
}
function flush() {
  if (!heldN) return;
  const out = new Float32Array(heldN);
  let at = 0;
  for (const b of held) { out.set(b, at); at += b.length; }
  held = []; heldN = 0;
  send(out);
}
function collect(block) {
  held.push(block); heldN += block.length;
  if (heldN >= SEND) flush();
}
function closeMic(m) {
  m.node.port.onmessage = null;
  m.src.disconnect(); m.node.disconnect();
  m.stream.getTracks().forEach(t => t.stop());
}
async function startTalk() {
  if (talking) return;
  talking = true; const mine = ++press;
  $('talk').classList.add('on');
  if (!navigator.mediaDevices || !window.AudioWorkletNode) { note('the microphone needs https or localhost'); stopTalk(); return; }
  try {
    const a = audio();
    await (worklet = worklet || a.audioWorklet.addModule('/mic-worklet.js'));
    const stream = await navigator.mediaDevices.getUserMedia(
      {audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true}});
    const src = a.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(a, 'mic-16k');
    const mute = a.createGain(); mute.gain.value = 0;   // keeps the node pulled by the graph
    src.connect(node).connect(mute).connect(a.destination);
    const m = {stream, src, node};
    if (!talking || mine !== press) { closeMic(m); return; }   // released while it was opening
    node.port.onmessage = e => collect(e.data);
    mic = m; note('listening');
  } catch (err) { note('microphone: ' + err.message); stopTalk(); }
}
function stopTalk() {
  if (!talking) return;
  talking = false;
  $('talk').classList.remove('on');
  if (mic) { closeMic(mic); mic = null; note(''); }
  flush();
}
const talk = $('talk');
talk.addEventListener('pointerdown', e => { e.preventDefault(); talk.setPointerCapture(e.pointerId); startTalk(); });
for (const t of ['pointerup', 'pointercancel', 'lostpointercapture']) talk.addEventListener(t, stopTalk);
talk.addEventListener('contextmenu', e => e.preventDefault());
const spaceKey = e => e.code === 'Space' && e.target !== $('text');
document.addEventListener('keydown', e => { if (spaceKey(e)) { e.preventDefault(); if (!e.repeat) startTalk(); } });
document.addEventListener('keyup', e => { if (spaceKey(e)) { e.preventDefault(); stopTalk(); } });
window.addEventListener('blur', stopTalk);
