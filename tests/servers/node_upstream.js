// A Node `http` upstream for tests (tests/realservers.py starts it): default server settings
// (keepAliveTimeout 5 s), so the sidecar meets Node as deployed. It listens on 127.0.0.1, an
// ephemeral port, and prints the port on stdout once listening: that line is the readiness
// handshake.
//
// Endpoints:
//   /trailers         chunked body, then the trailer `X-Checksum: abc123` (announced by `Trailer`)
//   /plain            a small text body with Content-Length
//   /no-content-type  a body without Content-Type (`?chunked`: framed chunked)
//   /latin            header `X-Latin: caf\xe9` (the byte E9 on the wire; `?chunked`: chunked body;
//                     `?late`: the head with Content-Length and 1 byte first, the rest 50 ms later)
//   /early-401        401 at once, without reading the request body
//   /upload           reads the body, answers its length and sha256 as JSON
//   /anything...      echoes method, target, raw request headers and body (base64) as JSON
//   /bytes/<n>        n bytes of a fixed pattern (`?chunked`: framed chunked)
//   /status/<n>       status n, no Content-Type, empty body
//   /connection       the caller's port: which connection a request came on
'use strict';
const http = require('http');
const crypto = require('crypto');

function pattern(size) {
  const out = Buffer.alloc(size);
  for (let i = 0; i < size; i++) out[i] = i % 256;
  return out;
}

function readBody(req, done) {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => done(Buffer.concat(chunks)));
}

function send(res, status, headers, body, chunked) {
  if (!chunked) headers['Content-Length'] = body.length;
  res.writeHead(status, headers);
  if (chunked && body.length > 1) {
    // Two writes: Node frames a body without Content-Length as chunks.
    res.write(body.subarray(0, 1));
    res.end(body.subarray(1));
  } else {
    res.end(body);
  }
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://upstream');
  const path = url.pathname;
  const chunked = url.searchParams.has('chunked');
  if (path === '/trailers') {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Trailer': 'X-Checksum' });
    res.write('part one\n');
    res.write('part two\n');
    res.addTrailers({ 'X-Checksum': 'abc123' });
    res.end();
  } else if (path === '/plain') {
    send(res, 200, { 'Content-Type': 'text/plain' }, Buffer.from('plain\n'), false);
  } else if (path === '/no-content-type') {
    send(res, 200, {}, Buffer.from('no type here\n'), chunked);
  } else if (path === '/latin') {
    // A latin1 string: Node writes header values byte per character, so \xe9 is the byte E9.
    const headers = { 'Content-Type': 'text/plain', 'X-Latin': 'caf\xe9' };
    if (url.searchParams.has('late')) {
      // Buffers, not strings, and no flushHeaders(): Node writes the head as UTF-8 (E9 -> C3 A9)
      // when it goes out glued to a string or alone, and as latin1 only next to a Buffer.
      res.writeHead(200, { ...headers, 'Content-Length': 5 });
      res.write(Buffer.from('l'));
      setTimeout(() => res.end(Buffer.from('atin')), 50);
    } else {
      send(res, 200, headers, Buffer.from('latin'), chunked);
    }
  } else if (path === '/early-401') {
    send(res, 401, { 'Content-Type': 'application/json', 'WWW-Authenticate': 'Bearer realm="test"' },
      Buffer.from('{"error": "unauthorized"}'), false);
  } else if (path === '/upload') {
    readBody(req, (body) => {
      const sha256 = crypto.createHash('sha256').update(body).digest('hex');
      send(res, 200, { 'Content-Type': 'application/json' },
        Buffer.from(JSON.stringify({ length: body.length, sha256 })), false);
    });
  } else if (path.startsWith('/anything')) {
    readBody(req, (body) => {
      const headers = [];
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        headers.push([req.rawHeaders[i].toLowerCase(), req.rawHeaders[i + 1]]);
      }
      headers.sort();
      const echoed = { method: req.method, target: req.url, headers, body: body.toString('base64') };
      send(res, 200, { 'Content-Type': 'application/json' }, Buffer.from(JSON.stringify(echoed)), false);
    });
  } else if (path.startsWith('/bytes/')) {
    send(res, 200, { 'Content-Type': 'application/octet-stream' }, pattern(Number(path.slice(7))), chunked);
  } else if (path === '/connection') {
    send(res, 200, { 'Content-Type': 'text/plain' }, Buffer.from(String(req.socket.remotePort)), false);
  } else if (path.startsWith('/status/')) {
    res.writeHead(Number(path.slice(8)));
    res.end();
  } else {
    send(res, 404, { 'Content-Type': 'text/plain' }, Buffer.from('not found'), false);
  }
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${server.address().port}\n`);
});
