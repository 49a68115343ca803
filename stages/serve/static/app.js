// vidu serve's page: upload a reference image -> POST /sessions; WebRTC (video + audio tracks, a
// "control" data channel) -> POST /sessions/{id}/offer; instructions and push-to-talk over the channel.
// A token, when the server has one, comes in the address: http://host:port/#token=TOKEN; a session to open
// (`vidu stream --serve` prints its stream's) too: http://host:port/#session=ID
'use strict';
const $ = id => document.getElementById(id);
const params = new URLSearchParams(location.hash.slice(1));
const token = params.get('token');
const auth = token ? {Authorization: 'Bearer ' + token} : {};
const state = {id: null, pc: null, channel: null, acks: 0, sent: 0, lastError: null};
window.vidu = state;                               // for tests and the console

function note(text) { $('note').textContent = text || ''; }

async function api(method, path, body, headers) {
  const r = await fetch(path, {method, body, headers: {...auth, ...(headers || {})}});
  const data = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

async function createSession(file, instruction, voice) {
  const form = new FormData();
  form.append('image', file, file.name || 'reference.png');
  if (instruction) form.append('instruction', instruction);
  if (voice) form.append('voice', voice);
  const info = await api('POST', '/sessions', form);
  state.id = info.id;
  note(`session ${info.id.slice(0, 8)}: ${info.width}x${info.height}, ${info.profile.name}`);
  await connect();
  return info;
}

function waitGathered(pc) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise(resolve => {
    const check = () => { if (pc.iceGatheringState === 'complete') resolve(); };
    pc.addEventListener('icegatheringstatechange', check);
    setTimeout(resolve, 3000);
  });
}

async function connect() {
  if (state.pc) state.pc.close();
  const ice = await api('GET', '/ice-servers');     // STUN / TURN of the server's --ice-server (none: host only)
  const pc = new RTCPeerConnection({iceServers: ice.iceServers});
  state.pc = pc;
  pc.addTransceiver('video', {direction: 'recvonly'});
  pc.addTransceiver('audio', {direction: 'recvonly'});
  const channel = pc.createDataChannel('control');
  state.channel = channel;
  channel.binaryType = 'arraybuffer';
  channel.onmessage = e => {
    const m = JSON.parse(e.data);
    if (m.type === 'ack') { state.acks += 1; note(m.text ? `instruction from chunk ${m.chunk}: ${m.text}` : `saying: ${m.said}`); }
    else if (m.type === 'command') { state.commands = (state.commands || 0) + 1; note(`heard "${m.text}": from chunk ${m.chunk}`); }
    else if (m.type === 'error') { state.lastError = m.error; note(m.error); }
  };
  const stream = new MediaStream();
  pc.ontrack = e => { stream.addTrack(e.track); $('view').srcObject = stream; };
  pc.onconnectionstatechange = () => {
    if (pc === state.pc && (pc.connectionState === 'failed' || pc.connectionState === 'disconnected'))
      setTimeout(() => pc === state.pc && connect().catch(err => note(err.message)), 1000);   // reconnect
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitGathered(pc);
  const answer = await api('POST', `/sessions/${state.id}/offer`, JSON.stringify(pc.localDescription),
                           {'Content-Type': 'application/json'});
  await pc.setRemoteDescription(answer);
}

function send(obj) {
  if (!state.channel || state.channel.readyState !== 'open') { note('not connected'); return false; }
  state.sent += 1;
  state.channel.send(JSON.stringify({id: state.sent, ...obj}));
  return true;
}

$('start').addEventListener('submit', async e => {
  e.preventDefault();
  const file = $('image').files[0];
  if (!file) { note('choose a reference image first'); return; }
  try { await createSession(file, $('first').value.trim(), $('voice').value); } catch (err) { note(err.message); }
});

$('say').addEventListener('submit', e => {
  e.preventDefault();
  const text = $('text').value.trim();
  if (text && send({type: $('speak').checked ? 'say' : 'instruction', text})) $('text').value = '';
});

$('sound').addEventListener('click', () => { const v = $('view'); v.muted = !v.muted; $('sound').textContent = v.muted ? 'Sound on' : 'Sound off'; });

// push-to-talk: the microphone at 16 kHz (mic-worklet.js), s16le over the channel
let mic = null;
async function talk(on) {
  $('talk').classList.toggle('on', on);
  if (!on) { if (mic) { mic.stream.getTracks().forEach(t => t.stop()); mic.ctx.close(); mic = null; } return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({audio: true});
    const ctx = new AudioContext();
    await ctx.audioWorklet.addModule('/mic-worklet.js');
    const node = new AudioWorkletNode(ctx, 'mic-16k');
    node.port.onmessage = e => {
      const f = e.data, pcm = new Int16Array(f.length);
      for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-1, Math.min(1, f[i])) * 32767;
      if (state.channel && state.channel.readyState === 'open') state.channel.send(pcm.buffer);
    };
    ctx.createMediaStreamSource(stream).connect(node);
    mic = {stream, ctx};
  } catch (err) { note('microphone: ' + err.message); $('talk').classList.remove('on'); }
}
$('talk').addEventListener('pointerdown', () => talk(true));
$('talk').addEventListener('pointerup', () => talk(false));
$('talk').addEventListener('pointerleave', () => mic && talk(false));

setInterval(async () => {
  if (!state.id) return;
  try {
    const s = await api('GET', `/sessions/${state.id}`);
    $('stats').textContent = `chunk ${s.chunks}  frames ${s.frames}  sent ${s.frames_sent}  dropped ${s.frames_dropped}` +
      `  ${s.profile.name} ${s.profile.chunk_ms} ms/chunk  instruction: ${s.instruction.slice(0, 40)}`;
  } catch (err) { note(err.message); }
}, 1000);

// a given session (the address's, or the page's own on `vidu stream --serve`): no upload, watch it
const given = params.get('session') || document.body.dataset.session;
if (given) {
  state.id = given;
  $('start').style.display = 'none';
  connect().catch(err => note(err.message));
}
