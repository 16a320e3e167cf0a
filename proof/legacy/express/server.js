// A naive Express SSE server, written the way tutorials write one: a
// setInterval that res.write()s an event, cleared when the request closes.
// No heartbeat, no Last-Event-ID, and it never ends a response.
//
// For the proof suite it takes its port and event interval from the
// environment (PORT, SSE_INTERVAL_MS) and prints one line per stream opened
// and closed to stdout ("SSELOG " + JSON), so the test can tell when the
// server let go of a stream. Each event's data carries the moment it was
// written (t, Unix milliseconds) for the latency figures.
const express = require('express');

const port = Number(process.env.PORT || 3000);
const interval = Number(process.env.SSE_INTERVAL_MS || 1000);
const instance = `${process.pid}-${Date.now()}`;
const now = () => performance.timeOrigin + performance.now();
const log = (fields) => console.log('SSELOG ' + JSON.stringify({ server: 'express', instance, t: now(), ...fields }));

const app = express();

app.get('/events', (req, res) => {
  const k = String(req.query.k || '');
  res.setHeader('Content-Type', 'text/event-stream');
  res.setHeader('Cache-Control', 'no-cache');
  res.setHeader('Connection', 'keep-alive');
  res.flushHeaders();
  log({ ev: 'open', k, method: req.method });

  let n = 0;
  const timer = setInterval(() => {
    n++;
    res.write(`data: ${JSON.stringify({ n, t: now(), i: instance, k })}\n\n`);
  }, interval);

  req.on('close', () => {
    clearInterval(timer);
    log({ ev: 'close', k, method: req.method, n });
  });
});

// Another route of the same server, to see whether streams starve it.
app.get('/hello', (req, res) => {
  res.send('hello\n');
});

app.listen(port, '127.0.0.1', () => log({ ev: 'listening', port }));
