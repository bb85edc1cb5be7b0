/**
 * `customdiff retrieve`: real regularisation images and their captions from a clip-retrieval knn
 * service, in the layout `customdiff train --class-dir` reads (`images/<i>.jpg`, `caption.txt`,
 * `urls.txt`, `images.txt`, line-aligned). Runs resume: a second run keeps what the first wrote.
 */
import { Command, Option } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { retrieveClassImages } from '../train/retrieve';
import { defineAction } from './action';
import { addCommonOptions, addExamples, addOverwriteOption, intArg, numberArg, usageError, type OverwriteOptions } from './options';

export interface RetrieveCliOptions extends OverwriteOptions {
  url?: string;
  query?: string;
  count?: number;
  outputDir?: string;
  indiceName?: string;
  aestheticScore?: number;
  aestheticWeight?: number;
  modality?: 'image' | 'text';
  concurrency?: number;
  timeout?: number;
  minImageSize?: number;
}

const OUTPUTS = ['images', 'caption.txt', 'urls.txt', 'images.txt'];

export function retrieveCommand(): Command {
  const cmd = new Command('retrieve')
    .summary('download real class images and captions from a clip-retrieval service')
    .description(
      'Download N real images and their captions for a class (e.g. "cat") from a clip-retrieval knn service, as ' +
        'regularisation images for prior preservation. The folder is what "customdiff train --class-dir" reads.',
    )
    .option('--url <url>', 'the knn service endpoint, e.g. http://localhost:1234/knn-service (the public LAION service is offline: run "clip-retrieval back" or use one you trust)')
    .option('--query <text>', 'what to search for: the class name, e.g. "cat"')
    .option('-n, --count <n>', 'how many images to keep (default 200, as the paper)', intArg(1, 100_000))
    .option('-o, --output-dir <dir>', 'where to write images/, caption.txt, urls.txt, images.txt')
    .option('--indice-name <name>', 'the index to search (default laion_400m)')
    .option('--aesthetic-score <s>', 'aesthetic score to favour (default 9)', numberArg())
    .option('--aesthetic-weight <w>', 'weight of the aesthetic score (default 0.1, as the original)', numberArg({ min: 0 }))
    .addOption(new Option('--modality <m>', 'search the image embeddings or the caption embeddings (default image)').choices(['image', 'text']))
    .option('--concurrency <n>', 'downloads in flight (default 4)', intArg(1, 64))
    .option('--timeout <seconds>', 'per download (default 30)', numberArg({ gt: 0 }))
    .option('--min-image-size <px>', 'refuse images whose shorter side is smaller (default 64)', intArg(1));
  addOverwriteOption(cmd);
  addCommonOptions(cmd);
  addExamples(cmd, [
    'customdiff retrieve --url http://localhost:1234/knn-service --query cat -n 200 -o real_reg/samples_cat',
    '# then: customdiff train … --class-dir real_reg/samples_cat --class-prompt cat',
  ]);
  return defineAction<RetrieveCliOptions>(
    cmd,
    async (ctx) => {
      const o = ctx.opts;
      if (!o.url) throw usageError('retrieve needs --url: the /knn-service endpoint of a clip-retrieval backend (the public LAION service is offline)');
      if (!/^https?:\/\//.test(o.url)) throw usageError(`--url ${o.url} is not an http(s) URL; give e.g. http://localhost:1234/knn-service`);
      if (!o.query || o.query.trim() === '') throw usageError('retrieve needs --query: the class to search for, e.g. --query cat');
      if (!o.outputDir) throw usageError('retrieve needs --output-dir, e.g. -o real_reg/samples_cat');
      const out = path.resolve(o.outputDir);
      const count = o.count ?? 200;

      const present = OUTPUTS.filter((f) => fs.existsSync(path.join(out, f)));
      const earlierRun = fs.existsSync(path.join(out, 'urls.txt'));
      if (present.length > 0) {
        if (o.overwrite) {
          ctx.reporter.info(`--overwrite: removing ${present.join(', ')} from ${out}`);
          for (const f of present) fs.rmSync(path.join(out, f), { recursive: true, force: true });
        } else if (!earlierRun) {
          throw usageError(`${out} already holds ${present.join(', ')} that no retrieval wrote; pass --overwrite to replace them, or choose another --output-dir`);
        } else {
          ctx.reporter.info(`${out} holds an earlier retrieval: keeping its images and downloading only what is missing (--overwrite starts over)`);
        }
      }

      const bar = ctx.reporter.progress({ label: 'retrieve', total: count, unit: 'image' });
      const r = await retrieveClassImages({
        url: o.url,
        query: o.query,
        // As given: images.txt lists `<dir>/images/<i>.jpg` the way the original scripts write it.
        outDir: o.outputDir,
        count,
        indiceName: o.indiceName,
        aestheticScore: o.aestheticScore,
        aestheticWeight: o.aestheticWeight,
        modality: o.modality,
        concurrency: o.concurrency,
        timeoutMs: o.timeout !== undefined ? o.timeout * 1000 : undefined,
        minImageSize: o.minImageSize,
        signal: ctx.signal,
        onProgress: (p) => {
          if (p.phase === 'resume') bar.update(p.kept);
          else if (p.phase === 'query') ctx.reporter.debug(`asked for ${p.requested} results, got ${p.results}`);
          else {
            bar.update(p.kept, { fields: { tried: String(p.tried) } });
            if (!p.ok) ctx.reporter.debug(`skipped ${p.url}: ${p.reason}`);
          }
        },
      });
      bar.stop();
      if (r.failed.length > 0) ctx.reporter.info(`${r.failed.length} downloads failed or were refused (--verbose lists them)`);
      ctx.reporter.result(
        `${r.count} images for "${o.query}" in ${out} (${r.downloaded} downloaded, ${r.existing} already there)\n` +
          `Use them with: customdiff train … --class-dir ${o.outputDir} --class-prompt "${o.query}"`,
        { outputDir: out, query: o.query, count: r.count, downloaded: r.downloaded, existing: r.existing, failed: r.failed, queries: r.queries },
      );
    },
    { interruptMessage: 'stopping the downloads (what was saved is kept; run the same command again to resume)' },
  );
}
