import { runCli } from '../helpers/env';

describe('customdiff doctor', () => {
  it('reports LibTorch, the addon and a working CPU', () => {
    const r = runCli(['doctor']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^LibTorch\s+\d+\.\d+/m);
    expect(r.stdout).toMatch(/^Addon\s+\/.*\.node$/m);
    expect(r.stdout).toMatch(/^CUDA\s+/m);
    expect(r.stdout).toMatch(/tensor round trip on cpu: ok/);
    if (process.env.OMP_WAIT_POLICY === undefined && process.env.GOMP_SPINCOUNT === undefined) {
      expect(r.stdout).toMatch(/^Threads .*; OpenMP wait policy ACTIVE, spin count 300000$/m);
    } else {
      expect(r.stdout).toMatch(/^Threads .*; OpenMP wait policy /m);
    }
  });

  it('prints one JSON object with --json', () => {
    const r = runCli(['doctor', '--json']);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.ok).toBe(true);
    expect(j.checks.cpu).toBe('ok');
    expect(typeof j.libtorch.version).toBe('string');
    expect(j.addonFile).toMatch(/\.node$/);
    expect(Array.isArray(j.cudaDevices)).toBe(true);
  });

  it('exits non-zero with instructions when no LibTorch can be found', () => {
    const r = runCli(['doctor'], { PYTHON: '/nonexistent/python3', LIBTORCH: '' });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/nothing usable/);
    expect(r.stderr).toMatch(/pip install torch/);
  });

  it('exits 2 on a usage error', () => {
    const r = runCli(['doctor', '--no-such-option']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/unknown option/);
    expect(runCli(['no-such-command']).code).toBe(2);
  });
});
