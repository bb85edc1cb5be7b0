'use strict';
// What the side-by-side benchmarks share: option parsing, the long-lived Python reference process
// (one JSON line per request), and medians.
const { spawn } = require('child_process');

/** `--key value` options over `defaults` (numbers parsed where the default is a number). */
function parseOptions(defaults, argv = process.argv.slice(2)) {
  const a = { ...defaults };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i].replace(/^--/, '');
    if (!(k in a)) throw new Error(`unknown option ${argv[i]}`);
    const v = argv[++i];
    a[k] = typeof a[k] === 'number' ? Number(v) : v;
  }
  return a;
}

/**
 * Starts `python3 -c script cfgJson` and keeps it up, so its rounds alternate with ours. `send(line)`
 * writes one line and resolves with the next JSON line the script prints; `ready` is its first line.
 */
function startPython(script, cfg) {
  const child = spawn(process.env.PYTHON || 'python3', ['-c', script, JSON.stringify(cfg)], {
    env: { ...process.env, OMP_NUM_THREADS: String(cfg.threads) },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let buf = '';
  let err = '';
  const waiters = [];
  child.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      const w = waiters.shift();
      if (w) w.resolve(JSON.parse(line));
    }
  });
  child.stderr.on('data', (d) => (err += d));
  child.on('exit', (code) => {
    for (const w of waiters.splice(0)) w.reject(new Error(`reference exited (${code}):\n${err}`));
  });
  const next = () => new Promise((resolve, reject) => waiters.push({ resolve, reject }));
  return {
    ready: next(),
    send(line) {
      const p = next();
      child.stdin.write(line + '\n');
      return p;
    },
    end(line) {
      child.stdin.end(line + '\n');
    },
  };
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

module.exports = { parseOptions, startPython, median };
