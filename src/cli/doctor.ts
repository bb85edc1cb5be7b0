import { Command } from 'commander';
import * as os from 'os';
import { info, type RuntimeInfo } from '../core/runtime';
import { Tensor } from '../core/tensor';
import { CustomDiffusionError } from '../errors';

function gib(bytes: number): string {
  return `${(bytes / 1024 ** 3).toFixed(1)} GiB`;
}

/** Runs a small tensor operation on a device to prove it works. */
async function probe(device: string): Promise<string> {
  const a = Tensor.fromArray(new Float32Array([1, 2, 3, 4]), [2, 2]);
  const b = await a.to({ device });
  const back = await b.to({ device: 'cpu' });
  const ok = Array.from(back.toArray() as Float32Array).join(',') === '1,2,3,4';
  for (const t of [a, b, back]) t.dispose();
  if (!ok) throw new Error(`a round trip through ${device} changed the data`);
  return 'ok';
}

export function formatInfo(i: RuntimeInfo): string {
  const lines = [
    `LibTorch      ${i.libtorch.version} (${i.libtorch.cuda ? 'CUDA build' : 'CPU build'}), found via ${i.libtorch.source}`,
    `              ${i.libtorch.root}`,
    `Addon         ${i.addonFile}`,
    `              compiled against LibTorch ${i.torchVersion}${i.builtWithCuda ? ' with CUDA' : ''}`,
    `CUDA          ${i.cudaAvailable ? `available, ${i.cudaDeviceCount} device(s)` : 'not available'}${i.cudaDriverVersion ? `, driver ${i.cudaDriverVersion}` : ''}`,
    `cuDNN         ${i.cudnnAvailable ? 'available' : 'not available'}`,
  ];
  for (const d of i.cudaDevices) {
    lines.push(`  cuda:${d.index}       ${d.name}, ${gib(d.totalMemory)}, compute capability ${d.computeCapability}`);
  }
  lines.push(
    `CPU           ${os.cpus()[0]?.model ?? 'unknown'} x${os.cpus().length}, ${gib(os.totalmem())} RAM`,
    `Threads       ${i.numThreads} intra-op, ${i.numInteropThreads} inter-op; oneDNN ${i.mkldnnAvailable ? 'yes' : 'no'}; OpenMP wait policy ${i.ompWaitPolicy ?? 'default'}${i.gompSpinCount ? `, spin count ${i.gompSpinCount}` : ''}`,
  );
  return lines.join('\n');
}

export function doctorCommand(): Command {
  return new Command('doctor')
    .summary('check LibTorch, devices and the addon')
    .description('Show what LibTorch, devices and addon this installation uses, and check they work.')
    .option('--json', 'print one JSON object')
    .addHelpText('after', '\nExamples:\n  $ customdiff doctor\n  $ customdiff doctor --json')
    .action(async (opts: { json?: boolean }) => {
      let i: RuntimeInfo;
      try {
        i = info();
      } catch (e) {
        const message = e instanceof Error ? e.message : String(e);
        if (opts.json) process.stdout.write(JSON.stringify({ ok: false, error: message }) + '\n');
        else process.stderr.write(`customdiff doctor: nothing usable.\n${message}\n`);
        process.exitCode = 1;
        return;
      }
      const checks: Record<string, string> = {};
      const devices = ['cpu', ...i.cudaDevices.map((d) => `cuda:${d.index}`)];
      for (const d of devices) {
        try {
          checks[d] = await probe(d);
        } catch (e) {
          checks[d] = `failed: ${e instanceof CustomDiffusionError || e instanceof Error ? e.message : String(e)}`;
        }
      }
      const ok = Object.values(checks).some((v) => v === 'ok');
      if (opts.json) {
        process.stdout.write(JSON.stringify({ ok, ...i, checks }) + '\n');
      } else {
        process.stdout.write(formatInfo(i) + '\n');
        for (const [d, v] of Object.entries(checks)) process.stdout.write(`Check         tensor round trip on ${d}: ${v}\n`);
      }
      if (!ok) process.exitCode = 1;
    });
}
