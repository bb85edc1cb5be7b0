/**
 * End to end: make a prebuild with `npm run prebuild`, pack the package, install the tarball into an
 * empty project on a PATH with no compiler, and check that the prebuild is the addon that loads;
 * then check that a prebuild recorded for another LibTorch is refused.
 *
 * Runs in a copy of the repository, because node-gyp rebuilds in place.
 */
import { execFileSync, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { repoRoot, tempDir } from '../helpers/env';

jest.setTimeout(30 * 60 * 1000);

function sh(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = process.env) {
  const r = spawnSync(cmd, args, { cwd, env, encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
  return { code: r.status, out: `${r.stdout}\n${r.stderr}` };
}

describe('prebuilt binaries', () => {
  let work: { dir: string; cleanup: () => void };
  let pkgDir: string;
  let tarball: string;
  let project: string;
  let noCompilerEnv: NodeJS.ProcessEnv;
  const python = execFileSync(process.env.PYTHON || 'python3', ['-c', 'import sys; print(sys.executable)'], {
    encoding: 'utf8',
  }).trim();

  beforeAll(() => {
    work = tempDir('cd-prebuild-');
    pkgDir = path.join(work.dir, 'pkg');
    project = path.join(work.dir, 'project');
    fs.mkdirSync(pkgDir);
    fs.mkdirSync(project);
    // A copy of the tracked files (plus node_modules by link), as a clean checkout would have.
    const files = execFileSync('git', ['ls-files', '-z'], { cwd: repoRoot, encoding: 'utf8' }).split('\0').filter(Boolean);
    for (const f of files) {
      if (f.startsWith('test/fixtures/')) continue;
      const src = path.join(repoRoot, f);
      if (!fs.existsSync(src)) continue;
      fs.mkdirSync(path.dirname(path.join(pkgDir, f)), { recursive: true });
      fs.copyFileSync(src, path.join(pkgDir, f));
    }
    fs.symlinkSync(path.join(repoRoot, 'node_modules'), path.join(pkgDir, 'node_modules'));

    // A PATH with node, npm and a shell, but no compiler, make or python.
    const bin = path.join(work.dir, 'bin');
    fs.mkdirSync(bin);
    const npmCli = path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'bin', 'npm-cli.js');
    fs.symlinkSync(process.execPath, path.join(bin, 'node'));
    fs.writeFileSync(path.join(bin, 'npm'), `#!/bin/sh\nexec "${process.execPath}" "${npmCli}" "$@"\n`, { mode: 0o755 });
    fs.symlinkSync('/bin/sh', path.join(bin, 'sh'));
    noCompilerEnv = { ...process.env, PATH: bin, PYTHON: python, CC: '/nonexistent/cc', CXX: '/nonexistent/c++' };
    delete noCompilerEnv.CUSTOM_DIFFUSION_ADDON;
    delete noCompilerEnv.LIBTORCH;
  });

  afterAll(() => work?.cleanup());

  it('npm run prebuild makes a prebuild recorded for the LibTorch at hand', () => {
    const r = sh('npm', ['run', 'prebuild'], pkgDir, { ...process.env, JOBS: '2' });
    expect(r.code).toBe(0);
    const dir = path.join(pkgDir, 'prebuilds', `${process.platform}-${process.arch}`);
    const nodes = fs.readdirSync(dir).filter((f) => f.endsWith('.node'));
    expect(nodes.length).toBe(1);
    expect(nodes[0]).toMatch(/^node\.napi\.(cpu|cuda)\.node$/);
    const sidecar = JSON.parse(fs.readFileSync(path.join(dir, nodes[0].replace(/\.node$/, '.libtorch.json')), 'utf8'));
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const here = require(path.join(repoRoot, 'scripts', 'find-libtorch.js')).findLibTorch();
    expect(sidecar.identity).toBe(here.identity);
    expect(nodes[0]).toBe(`node.napi.${here.cuda ? 'cuda' : 'cpu'}.node`);
  });

  it('npm pack + npm install <tarball> loads the prebuild with no compiler on PATH', () => {
    const packed = sh('npm', ['pack', '--silent'], pkgDir);
    expect(packed.code).toBe(0);
    tarball = path.join(pkgDir, packed.out.trim().split('\n')[0].trim());
    expect(fs.existsSync(tarball)).toBe(true);
    fs.writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'empty-project', version: '1.0.0', private: true }));
    const r = sh('npm', ['install', '--no-audit', '--no-fund', '--foreground-scripts', tarball], project, noCompilerEnv);
    expect(r.out).toMatch(/custom-diffusion: using prebuilds\/[^/]+\/node\.napi\.(cpu|cuda)\.node/);
    expect(r.code).toBe(0);
    expect(fs.existsSync(path.join(project, 'node_modules', 'custom-diffusion', 'build'))).toBe(false);
    const run = sh(
      'node',
      ['-e', "const cd = require('custom-diffusion'); const i = cd.info(); console.log(JSON.stringify({ addon: i.addonFile, v: i.torchVersion }))"],
      project,
      noCompilerEnv,
    );
    expect(run.code).toBe(0);
    expect(JSON.parse(run.out.trim().split('\n')[0]).addon).toMatch(/node_modules\/custom-diffusion\/prebuilds\/.*\/node\.napi\.(cpu|cuda)\.node$/);
  });

  it('refuses a prebuild made for another LibTorch, at install and at load', () => {
    const installed = path.join(project, 'node_modules', 'custom-diffusion');
    const dir = path.join(installed, 'prebuilds', `${process.platform}-${process.arch}`);
    const sidecar = fs.readdirSync(dir).find((f) => f.endsWith('.libtorch.json'))!;
    fs.writeFileSync(path.join(dir, sidecar), JSON.stringify({ identity: 'libtorch-1.13.1+cpu-cpu-abi0' }));

    const install = sh('node', [path.join(installed, 'scripts', 'install.js')], installed, noCompilerEnv);
    expect(install.out).toMatch(/not using .*node\.napi\.\w+\.node: built for libtorch-1\.13\.1\+cpu-cpu-abi0, but the LibTorch here is libtorch-/);
    expect(install.out).toMatch(/building the native addon from source/);
    expect(install.code).not.toBe(0); // no compiler on PATH: the source build cannot succeed

    const run = sh('node', ['-e', "try { require('custom-diffusion').info() } catch (e) { console.log(e.name + ': ' + e.message) }"], project, noCompilerEnv);
    expect(run.out).toMatch(/NativeLoadError: No native addon of custom-diffusion fits LibTorch/);
    expect(run.out).toMatch(/built for libtorch-1\.13\.1\+cpu-cpu-abi0/);
    expect(run.out).toMatch(/npm rebuild custom-diffusion/);
  });
});
