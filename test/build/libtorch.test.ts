import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { repoRoot, tempDir } from '../helpers/env';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const finder = require(path.join(repoRoot, 'scripts', 'find-libtorch.js'));
// eslint-disable-next-line @typescript-eslint/no-require-imports
const addon = require(path.join(repoRoot, 'scripts', 'addon.js'));

function runFinder(env: NodeJS.ProcessEnv, arg = '--json') {
  const clean = { ...process.env };
  delete clean.LIBTORCH;
  delete clean.PYTHON;
  return spawnSync(process.execPath, [path.join(repoRoot, 'scripts', 'find-libtorch.js'), arg], {
    encoding: 'utf8',
    env: { ...clean, ...env },
  });
}

describe('finding LibTorch', () => {
  const found = finder.findLibTorch();

  it('finds the torch package of python3 and describes it', () => {
    expect(found.source).toMatch(/torch package of|LIBTORCH/);
    expect(fs.existsSync(path.join(found.root, 'include', 'torch'))).toBe(true);
    expect(found.version).toMatch(/^\d+\.\d+/);
    expect(found.identity).toBe(`libtorch-${found.version}-${found.cuda ? 'cuda' : 'cpu'}-abi${found.cxx11Abi}`);
    expect(found.libs).toEqual(expect.arrayContaining(['torch', 'torch_cpu', 'c10']));
    if (found.cuda) expect(found.libs).toEqual(expect.arrayContaining(['torch_cuda', 'c10_cuda']));
  });

  it('loads an addon whose compiled-in LibTorch identity is the one found here', () => {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { info } = require(path.join(repoRoot, 'src'));
    expect(info().libtorchIdentity).toBe(found.identity);
  });

  it('keeps libtorch_cuda linked with --no-as-needed and embeds an rpath', () => {
    const flags: string[] = finder.linkFlags(found);
    expect(flags).toContain(`-Wl,-rpath,${found.libDir}`);
    const noAsNeeded = flags.indexOf('-Wl,--no-as-needed');
    expect(noAsNeeded).toBeGreaterThanOrEqual(0);
    expect(flags.indexOf('-ltorch')).toBeGreaterThan(noAsNeeded);
    if (found.cuda) expect(flags.indexOf('-ltorch_cuda')).toBeGreaterThan(noAsNeeded);
  });

  it('prefers LIBTORCH when it points to a LibTorch folder', () => {
    const r = runFinder({ LIBTORCH: found.root });
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ source: 'LIBTORCH', root: found.root, identity: found.identity });
  });

  it('says how to get LibTorch when none is found, without a linker trace', () => {
    const r = runFinder({ PYTHON: '/nonexistent/python3' });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/LibTorch was not found/);
    expect(r.stderr).toMatch(/python3 -m pip install torch/);
    expect(r.stderr).toMatch(/LIBTORCH=\/path\/to\/libtorch/);
    expect(r.stderr).not.toMatch(/undefined reference|^\/usr\/bin\/ld|collect2/m);
  });

  it('rejects a LIBTORCH that is not a LibTorch folder', () => {
    const t = tempDir();
    try {
      const r = runFinder({ LIBTORCH: t.dir });
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/LIBTORCH is set to .*, but that folder is not a LibTorch/);
    } finally {
      t.cleanup();
    }
  });
});

describe('choosing the addon for the LibTorch at hand', () => {
  const here = finder.findLibTorch();
  let pkg: { dir: string; cleanup: () => void };
  beforeEach(() => (pkg = tempDir('cd-pkg-')));
  afterEach(() => pkg.cleanup());

  function place(rel: string, identity: string | null) {
    const file = path.join(pkg.dir, rel);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, 'not really an addon');
    if (identity) fs.writeFileSync(addon.sidecarOf(file), JSON.stringify({ identity }));
    return file;
  }

  it('picks the prebuild recorded for this LibTorch and refuses the others', () => {
    const plat = `prebuilds/${process.platform}-${process.arch}`;
    place(`${plat}/node.napi.cpu.node`, 'libtorch-1.0.0+cpu-cpu-abi1');
    const good = place(`${plat}/node.napi.cuda.node`, here.identity);
    const r = addon.select(here, pkg.dir, {});
    expect(r.file).toBe(good);
    expect(r.rejected.join('\n')).toMatch(/node\.napi\.cpu\.node: built for libtorch-1\.0\.0\+cpu-cpu-abi1, but the LibTorch here is/);
  });

  it('prefers a local source build that matches, and refuses one without a record', () => {
    place('build/Release/custom_diffusion.node', null);
    let r = addon.select(here, pkg.dir, {});
    expect(r.file).toBeNull();
    expect(r.rejected[0]).toMatch(/no record of the LibTorch it was built for/);
    const built = place('build/Release/custom_diffusion.node', here.identity);
    place(`prebuilds/${process.platform}-${process.arch}/node.napi.cuda.node`, here.identity);
    r = addon.select(here, pkg.dir, {});
    expect(r.file).toBe(built);
  });

  it('ignores prebuilds for other platforms and Node ABIs', () => {
    place('prebuilds/win32-x64/node.napi.cuda.node', here.identity);
    place(`prebuilds/${process.platform}-${process.arch}/node.abi99.node`, here.identity);
    expect(addon.select(here, pkg.dir, {}).file).toBeNull();
  });

  it('honours CUSTOM_DIFFUSION_ADDON as an explicit choice', () => {
    const file = place('elsewhere/x.node', null);
    expect(addon.select(here, pkg.dir, { CUSTOM_DIFFUSION_ADDON: file }).file).toBe(file);
  });
});

describe('OpenMP wait policy', () => {
  // The addon is loaded once per process, so each case runs in a fresh Node process.
  const probe = (env: NodeJS.ProcessEnv) => {
    const clean = { ...process.env };
    delete clean.OMP_WAIT_POLICY;
    delete clean.GOMP_SPINCOUNT;
    const script =
      "const cd = require('./lib'); const i = cd.info(); console.log(JSON.stringify({ policy: i.ompWaitPolicy, spin: i.gompSpinCount, " +
      'after: [process.env.OMP_WAIT_POLICY ?? null, process.env.GOMP_SPINCOUNT ?? null] }))';
    const r = spawnSync(process.execPath, ['-e', script], { cwd: repoRoot, encoding: 'utf8', env: { ...clean, ...env } });
    expect(r.status).toBe(0);
    return JSON.parse(r.stdout.trim().split('\n').pop()!) as { policy: string | null; spin: string | null; after: (string | null)[] };
  };

  it('lets OpenMP wait spinning for a bounded time unless the user chose, and leaves the environment as it was', () => {
    expect(probe({})).toEqual({ policy: 'ACTIVE', spin: '300000', after: [null, null] });
    expect(probe({ OMP_WAIT_POLICY: 'PASSIVE' })).toEqual({ policy: 'PASSIVE', spin: null, after: ['PASSIVE', null] });
    expect(probe({ GOMP_SPINCOUNT: '1000' })).toEqual({ policy: null, spin: '1000', after: [null, '1000'] });
  });
});
