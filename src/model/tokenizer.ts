/**
 * CLIP byte-level BPE tokenizer, token-for-token equal to Hugging Face transformers' `CLIPTokenizer`
 * (transformers v5, backed by the `tokenizers` library) as diffusers loads it from a Stable Diffusion
 * pipeline's `tokenizer` subfolder with `CLIPTokenizer.from_pretrained(folder)`.
 *
 * What transformers v5 does, and what this module reproduces:
 *
 * 1. **Added tokens first.** Tokens added to the vocabulary (the special tokens `<|startoftext|>`,
 *    `<|endoftext|>`, a `"!"` pad token, and anything added with {@link ClipTokenizer.addTokens}) are
 *    cut out of the text before any other processing, leftmost-longest, also in the middle of a word
 *    (`"a<new1>cat"` → `a`, `<new1>`, `cat`). Tokens flagged `normalized: false` are matched in the raw
 *    text, case-sensitively; `normalized: true` ones are matched in the normalized text (so `<NEW1>`
 *    matches `<new1>`).
 * 2. **Normalization**: Unicode NFC, every whitespace run → one space, lowercase (per character, no
 *    final-sigma rule). There is no ftfy, no HTML unescaping (`&amp;` stays `&amp;`), no accent
 *    stripping and no CJK spacing: transformers v5 has no Python "slow" CLIP tokenizer any more, so the
 *    `ftfy`/`BasicTokenizer` text cleanup of older versions is never used.
 * 3. **Pre-tokenization**: the CLIP regex
 *    `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+` keeps its
 *    matches and drops whitespace; each piece is then split again by the GPT-2 byte-level regex and
 *    mapped byte-by-byte onto printable characters.
 * 4. **BPE** per piece, the last character carrying `</w>`, merges applied lowest rank first
 *    (ties: leftmost), exactly as `tokenizers`' `Word::merge_all`.
 * 5. **Post-processing**: BOS + ids + EOS; truncation keeps `maxLength - 2` content ids; padding on the
 *    right with the folder's pad token (`<|endoftext|>` = 49407 for SD1, `"!"` = 0 for SD2).
 *
 * @packageDocumentation
 */

import { promises as fs } from 'fs';
import * as path from 'path';
import { FileError, InvalidArgumentError } from '../errors';

/** Flags of an added token, as `tokenizers.AddedToken` has them. */
export interface AddedTokenOptions {
  /** Only match when not surrounded by word characters. Default `false`. */
  singleWord?: boolean;
  /** Swallow the whitespace on the left of a match. Default `false`. */
  lstrip?: boolean;
  /** Swallow the whitespace on the right of a match. Default `false`. */
  rstrip?: boolean;
  /** Match against the normalized (lowercased, NFC) text. Default `!special`. */
  normalized?: boolean;
  /** A special token: skipped by `decode(ids, { skipSpecialTokens: true })`. Default `false`. */
  special?: boolean;
}

/** A token to add: its text, with optional {@link AddedTokenOptions}. */
export interface AddedTokenSpec extends AddedTokenOptions {
  content: string;
}

/** A fully specified added token. */
interface AddedToken {
  content: string;
  singleWord: boolean;
  lstrip: boolean;
  rstrip: boolean;
  normalized: boolean;
  special: boolean;
}

/** How {@link ClipTokenizer.encodeBatch} pads. */
export type PaddingStrategy = 'max_length' | 'longest' | 'do_not_pad';

/** Options of {@link ClipTokenizer.encodeBatch}, named after transformers' `__call__` arguments. */
export interface EncodeBatchOptions {
  /** `'max_length'` pads every row to `maxLength`, `'longest'` to the longest row. Default `'do_not_pad'`. */
  padding?: PaddingStrategy;
  /** Cut rows longer than `maxLength` (keeping BOS and EOS). Default `false`. */
  truncation?: boolean;
  /** Length used by truncation and `'max_length'` padding. Default {@link ClipTokenizer.modelMaxLength}. */
  maxLength?: number;
  /** Add BOS and EOS. Default `true`. */
  addSpecialTokens?: boolean;
}

/** Options of {@link ClipTokenizer.decode}. */
export interface DecodeOptions {
  /** Leave out special tokens (BOS, EOS, pad). Default `false`. */
  skipSpecialTokens?: boolean;
}

/** Contents of a tokenizer folder, already parsed (see {@link ClipTokenizer.fromObjects}). */
export interface ClipTokenizerFiles {
  /** `vocab.json`: token → id. */
  vocab: Record<string, number>;
  /** `merges.txt` as text, or the merges as pairs in rank order. */
  merges: string | Array<[string, string]>;
  /** `tokenizer_config.json`, if any. */
  tokenizerConfig?: Record<string, unknown>;
  /** `special_tokens_map.json`, if any. */
  specialTokensMap?: Record<string, unknown>;
  /** `added_tokens.json` (token → id), if any. */
  addedTokens?: Record<string, number>;
}

// ---------------------------------------------------------------------------------------------
// Character classes. `\s` in the regexes of `tokenizers` (Oniguruma) is Unicode White_Space: it
// includes U+0085 but, unlike JavaScript's `\s`, not U+FEFF.
// ---------------------------------------------------------------------------------------------

const WS = '\\t\\n\\v\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const WS_RUN = new RegExp(`[${WS}]+`, 'gu');
/** CLIP's pre-tokenization pattern (tokenizers `Split`, matches kept, the rest dropped). */
const CLIP_SPLIT = new RegExp(
  `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^${WS}\\p{L}\\p{N}]+`,
  'gu',
);
/** GPT-2's pattern, applied by the `ByteLevel` pre-tokenizer to every piece (isolated split). */
const BYTE_LEVEL_SPLIT = new RegExp(
  `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${WS}\\p{L}\\p{N}]+|[${WS}]+(?![^${WS}])|[${WS}]+`,
  'gu',
);
/** Rust regex `\w` (Unicode), used by `singleWord` added tokens. */
const WORD_CHAR = /[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]/u;
const ENDS_WITH_WORD = new RegExp(`${WORD_CHAR.source}$`, 'u');
const STARTS_WITH_WORD = new RegExp(`^${WORD_CHAR.source}`, 'u');
const LEADING_WS = /^\p{White_Space}*/u;
const TRAILING_WS = /\p{White_Space}*$/u;
/** Characters Python's `str.strip()` removes (used by CLIP's decode). */
const PY_WS = '\\t\\n\\v\\f\\r\\x1c-\\x1f \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const PY_STRIP = new RegExp(`^[${PY_WS}]+|[${PY_WS}]+$`, 'gu');

/** The named special-token keys of transformers, in the order it adds them. */
const SPECIAL_KEYS = ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token'] as const;

/** Default model max length when `tokenizer_config.json` has none (CLIP's context length). */
const DEFAULT_MAX_LENGTH = 77;
/** Entries kept in the BPE cache before it is cleared. */
const CACHE_CAPACITY = 10000;
/** Ids must stay below this so that a pair of ids packs into one exact double. */
const MAX_ID = 2 ** 26;

/** GPT-2/CLIP byte → printable character map. */
function byteToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const map: string[] = new Array(256);
  for (const b of bs) map[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (map[b] === undefined) map[b] = String.fromCharCode(256 + n++);
  }
  return map;
}

const BYTE_TO_CHAR = byteToUnicode();
const CHAR_TO_BYTE = new Map<string, number>(BYTE_TO_CHAR.map((c, b) => [c, b]));
const UTF8 = new TextEncoder();
const UTF8_LOSSY = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });

/**
 * The normalizer of transformers v5's CLIPTokenizer: NFC, whitespace runs → `' '`, lowercase.
 * Lowercasing is per character (Rust `char::to_lowercase`), so a final capital sigma becomes `σ`
 * and not `ς` as `String.prototype.toLowerCase` would make it.
 */
export function normalizeClipText(text: string): string {
  return text.normalize('NFC').replace(WS_RUN, ' ').replace(/\u03a3/g, '\u03c3').toLowerCase();
}

/** A binary min-heap of pending merges ordered by (rank, position), as tokenizers' `Merge`. */
class MergeHeap {
  private readonly rank: number[] = [];
  private readonly pos: number[] = [];
  private readonly newId: number[] = [];

  get size(): number {
    return this.rank.length;
  }

  private less(i: number, j: number): boolean {
    return this.rank[i] < this.rank[j] || (this.rank[i] === this.rank[j] && this.pos[i] < this.pos[j]);
  }

  private swap(i: number, j: number): void {
    const r = this.rank[i];
    this.rank[i] = this.rank[j];
    this.rank[j] = r;
    const p = this.pos[i];
    this.pos[i] = this.pos[j];
    this.pos[j] = p;
    const n = this.newId[i];
    this.newId[i] = this.newId[j];
    this.newId[j] = n;
  }

  push(rank: number, pos: number, newId: number): void {
    this.rank.push(rank);
    this.pos.push(pos);
    this.newId.push(newId);
    let i = this.rank.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.less(i, parent)) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  /** Removes the top; returns [rank, pos, newId]. */
  pop(out: [number, number, number]): void {
    out[0] = this.rank[0];
    out[1] = this.pos[0];
    out[2] = this.newId[0];
    const last = this.rank.length - 1;
    this.swap(0, last);
    this.rank.pop();
    this.pos.pop();
    this.newId.pop();
    let i = 0;
    const n = this.rank.length;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < n && this.less(l, m)) m = l;
      if (r < n && this.less(r, m)) m = r;
      if (m === i) break;
      this.swap(i, m);
      i = m;
    }
  }
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function sameAddedToken(a: AddedToken, b: AddedToken): boolean {
  return (
    a.content === b.content &&
    a.singleWord === b.singleWord &&
    a.lstrip === b.lstrip &&
    a.rstrip === b.rstrip &&
    a.normalized === b.normalized &&
    a.special === b.special
  );
}

/** Python `AddedToken(**d)`: `special` defaults to false, `normalized` to `!special`. */
function addedTokenFromDict(d: Record<string, unknown>, where: string, forceSpecial?: boolean): AddedToken {
  if (typeof d.content !== 'string') {
    throw new InvalidArgumentError(`${where}: an added token needs a string "content", got ${JSON.stringify(d)}.`);
  }
  const special = forceSpecial ?? Boolean(d.special ?? false);
  return {
    content: d.content,
    singleWord: Boolean(d.single_word ?? false),
    lstrip: Boolean(d.lstrip ?? false),
    rstrip: Boolean(d.rstrip ?? false),
    normalized: typeof d.normalized === 'boolean' ? d.normalized : !special,
    special,
  };
}

/** A special-token value as transformers holds it: a plain string or an AddedToken. */
type TokenValue = string | AddedToken;

function tokenText(v: TokenValue): string {
  return typeof v === 'string' ? v : v.content;
}

function sameTokenValue(a: TokenValue, b: TokenValue): boolean {
  if (typeof a === 'string' || typeof b === 'string') return a === b;
  return sameAddedToken(a, b);
}

/** Parses `merges.txt` exactly as tokenizers does (lines starting with `#version` are skipped). */
function parseMerges(text: string, file: string): Array<[string, string]> {
  const lines = text.split('\n');
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  const merges: Array<[string, string]> = [];
  let rank = 0;
  for (let i = 0; i < lines.length; i++) {
    let line = lines[i];
    if (line.endsWith('\r')) line = line.slice(0, -1);
    if (line.startsWith('#version')) continue;
    rank++;
    const parts = line.split(' ');
    if (parts.length !== 2 || parts[0] === '' || parts[1] === '') {
      throw new FileError(
        `${file}: malformed merge on line ${i + 1} (merge #${rank}): expected two tokens separated by one space, got ${JSON.stringify(line)}.`,
        file,
      );
    }
    merges.push([parts[0], parts[1]]);
  }
  return merges;
}

async function readTextFile(file: string, required: boolean, what: string): Promise<string | undefined> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !required) return undefined;
    if (code === 'ENOENT') {
      throw new FileError(`Missing ${path.basename(file)} in ${path.dirname(file)}: ${what}.`, file, { cause: err });
    }
    throw new FileError(`Cannot read ${file}: ${(err as Error).message}`, file, { cause: err });
  }
}

function parseJsonObject(text: string, file: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new FileError(`${file} is not valid JSON: ${(err as Error).message}`, file, { cause: err });
  }
  if (!isRecord(value)) throw new FileError(`${file} must hold a JSON object.`, file);
  return value;
}

/**
 * A CLIP BPE tokenizer that produces exactly the ids of transformers' `CLIPTokenizer` loaded from
 * the same folder (SD1 `tokenizer/`, SD2 `tokenizer/` with its `"!"` pad token, or any folder in the
 * Hugging Face `vocab.json` + `merges.txt` layout).
 *
 * @example
 * ```ts
 * const tok = await ClipTokenizer.fromFolder('sd15/tokenizer');
 * const [newId] = tok.addTokens(['<new1>']);                      // 49408
 * tok.encodeBatch(['photo of a <new1> cat'], { padding: 'max_length', truncation: true });
 * // [[49406, 1125, 539, 320, 49408, 2368, 49407, 49407, ...]]     (77 ids)
 * ```
 */
export class ClipTokenizer {
  /** The model vocabulary (vocab.json). */
  private readonly vocab: Map<string, number>;
  /** Id → model token. */
  private readonly modelTokens = new Map<number, string>();
  /** Packed id pair → merge rank. */
  private readonly mergeRanks = new Map<number, number>();
  /** Merge rank → id of the merged token. */
  private readonly mergeNewIds: Int32Array;
  private readonly unkToken: string | undefined;
  /** Added tokens by id, by original content, and their normalized content where it differs. */
  private readonly addedById = new Map<number, AddedToken>();
  private readonly addedByContent = new Map<string, number>();
  private readonly addedNormalized = new Map<number, string>();
  private readonly specialContents = new Set<string>();
  private rawMatcher: RegExp | undefined;
  private normalizedMatcher: RegExp | undefined;
  private readonly cache = new Map<string, number[]>();
  private readonly bosToken: string | undefined;
  private readonly eosToken: string | undefined;
  private readonly padToken: string | undefined;

  /** Id of `<|startoftext|>` (49406 in CLIP). */
  readonly bosTokenId: number;
  /** Id of `<|endoftext|>` (49407 in CLIP). */
  readonly eosTokenId: number;
  /** Id used for padding: 49407 in SD1 (`<|endoftext|>`), 0 in SD2 (`"!"`); `undefined` if none. */
  readonly padTokenId: number | undefined;
  /** `model_max_length` of tokenizer_config.json (77 for CLIP; 77 when absent). */
  readonly modelMaxLength: number;

  private constructor(files: ClipTokenizerFiles, source: string) {
    // --- model vocabulary -------------------------------------------------------------------
    this.vocab = new Map();
    if (!isRecord(files.vocab)) throw new FileError(`${source}: vocab.json must hold a JSON object of token → id.`, source);
    for (const [token, id] of Object.entries(files.vocab)) {
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= MAX_ID) {
        throw new FileError(
          `${source}: vocab.json maps ${JSON.stringify(token)} to ${JSON.stringify(id)}; ids must be integers in [0, ${MAX_ID}).`,
          source,
        );
      }
      this.vocab.set(token, id);
      this.modelTokens.set(id, token);
    }
    if (this.vocab.size === 0) throw new FileError(`${source}: vocab.json is empty.`, source);

    // --- merges -----------------------------------------------------------------------------
    const merges = typeof files.merges === 'string' ? parseMerges(files.merges, source) : files.merges;
    this.mergeNewIds = new Int32Array(merges.length);
    merges.forEach(([a, b], rank) => {
      const aId = this.vocab.get(a);
      const bId = this.vocab.get(b);
      const newId = this.vocab.get(a + b);
      const missing = aId === undefined ? a : bId === undefined ? b : newId === undefined ? a + b : undefined;
      if (missing !== undefined) {
        throw new FileError(
          `${source}: merge #${rank + 1} (${JSON.stringify(`${a} ${b}`)}) uses ${JSON.stringify(missing)}, which is not in vocab.json.`,
          source,
        );
      }
      // Later duplicates overwrite earlier ones, as tokenizers' HashMap does.
      this.mergeRanks.set(aId! * MAX_ID + bId!, rank);
      this.mergeNewIds[rank] = newId!;
    });

    // --- special tokens, resolved as transformers v5 `from_pretrained` does -------------------
    const config = files.tokenizerConfig ?? {};
    const named = new Map<string, TokenValue | null>();
    const fromConfig = (value: unknown, where: string): TokenValue | null | undefined => {
      if (value === null) return null;
      if (typeof value === 'string') return value;
      if (isRecord(value)) return addedTokenFromDict(value, where);
      return undefined;
    };
    for (const key of SPECIAL_KEYS) {
      if (key in config) {
        const v = fromConfig(config[key], `tokenizer_config.json ${key}`);
        if (v !== undefined) named.set(key, v);
      }
    }
    let extra: TokenValue[] = [];
    const extraOf = (list: unknown, where: string, special: boolean): TokenValue[] =>
      Array.isArray(list)
        ? list.map((t) => (isRecord(t) ? addedTokenFromDict(t, where, special ? true : undefined) : String(t)))
        : [];
    extra = extraOf(config.extra_special_tokens ?? config.additional_special_tokens, 'tokenizer_config.json', false);

    const addedDecoder = new Map<number, AddedToken>();
    const addedMap = new Map<string, AddedToken>();
    if (isRecord(config.added_tokens_decoder)) {
      for (const [idx, tok] of Object.entries(config.added_tokens_decoder)) {
        if (!isRecord(tok)) {
          throw new FileError(`${source}: tokenizer_config.json added_tokens_decoder[${idx}] must be an object.`, source);
        }
        const t = addedTokenFromDict(tok, `tokenizer_config.json added_tokens_decoder[${idx}]`);
        addedDecoder.set(Number(idx), t);
        addedMap.set(t.content, t);
      }
    } else {
      // Legacy layout (SD1/SD2 folders): special_tokens_map.json overrides tokenizer_config.json.
      for (const [key, value] of Object.entries(files.specialTokensMap ?? {})) {
        if (key === 'extra_special_tokens' || key === 'additional_special_tokens') {
          const more = extraOf(value, 'special_tokens_map.json', true);
          for (const t of more) if (!extra.some((e) => sameTokenValue(e, t))) extra.push(t);
        } else if ((SPECIAL_KEYS as readonly string[]).includes(key)) {
          if (isRecord(value)) named.set(key, addedTokenFromDict(value, `special_tokens_map.json ${key}`, true));
          else if (typeof value === 'string' || value === null) named.set(key, value);
        }
      }
      if (files.addedTokens) {
        const specials = new Set<string>();
        for (const v of named.values()) if (v !== null) specials.add(tokenText(v));
        for (const v of extra) specials.add(tokenText(v));
        for (const [content, index] of Object.entries(files.addedTokens)) {
          if (typeof index !== 'number' || !Number.isInteger(index) || index < 0) {
            throw new FileError(`${source}: added_tokens.json maps ${JSON.stringify(content)} to an invalid id.`, source);
          }
          const isSpecial = specials.has(content);
          const t: AddedToken = {
            content,
            singleWord: false,
            lstrip: false,
            rstrip: false,
            normalized: !isSpecial,
            special: isSpecial,
          };
          addedDecoder.set(index, t);
          addedMap.set(content, t);
        }
      }
    }
    if (addedMap.size > 0) {
      for (const [key, v] of named) if (v !== null) named.set(key, addedMap.get(tokenText(v)) ?? v);
    }
    // CLIPTokenizer's defaults.
    const defaults: Record<string, string> = {
      unk_token: '<|endoftext|>',
      bos_token: '<|startoftext|>',
      eos_token: '<|endoftext|>',
      pad_token: '<|endoftext|>',
    };
    for (const [key, v] of Object.entries(defaults)) if (!named.has(key)) named.set(key, v);

    const unk = named.get('unk_token');
    this.unkToken = unk ? tokenText(unk) : undefined;

    // TokenizersBackend.__init__: add added_tokens_decoder (by id), then every named / extra special
    // token not already among them. Plain strings become special, non-normalized tokens.
    const tokensToAdd: TokenValue[] = [...addedDecoder.entries()].sort((x, y) => x[0] - y[0]).map(([, t]) => t);
    const encoder = new Set(tokensToAdd.map(tokenText));
    const orderedNamed = SPECIAL_KEYS.map((k) => named.get(k)).filter((v): v is TokenValue => v != null);
    for (const value of [...orderedNamed, ...extra]) {
      if (!encoder.has(tokenText(value)) && !tokensToAdd.some((t) => sameTokenValue(t, value))) tokensToAdd.push(value);
    }
    const namedTexts = new Set(orderedNamed.map(tokenText));
    this.addAddedTokens(
      tokensToAdd.map((t): AddedToken => {
        if (typeof t === 'string') {
          return { content: t, singleWord: false, lstrip: false, rstrip: false, normalized: false, special: true };
        }
        return !t.special && namedTexts.has(t.content) ? { ...t, special: true } : t;
      }),
    );

    const bos = named.get('bos_token');
    const eos = named.get('eos_token');
    const pad = named.get('pad_token');
    this.bosToken = bos ? tokenText(bos) : undefined;
    this.eosToken = eos ? tokenText(eos) : undefined;
    this.padToken = pad ? tokenText(pad) : undefined;
    const idOf = (token: string | undefined, what: string): number => {
      const id = token === undefined ? undefined : this.tokenId(token) ?? (this.unkToken ? this.tokenId(this.unkToken) : undefined);
      if (id === undefined) throw new FileError(`${source}: the ${what} token ${JSON.stringify(token)} has no id.`, source);
      return id;
    };
    this.bosTokenId = idOf(this.bosToken, 'bos');
    this.eosTokenId = idOf(this.eosToken, 'eos');
    this.padTokenId = this.padToken === undefined ? undefined : idOf(this.padToken, 'pad');

    const maxLen = config.model_max_length;
    if (maxLen === undefined || maxLen === null) this.modelMaxLength = DEFAULT_MAX_LENGTH;
    else if (typeof maxLen === 'number' && Number.isInteger(maxLen) && maxLen > 0) this.modelMaxLength = maxLen;
    else throw new FileError(`${source}: model_max_length must be a positive integer, got ${JSON.stringify(maxLen)}.`, source);
  }

  /**
   * Loads a tokenizer folder in the Hugging Face layout: `vocab.json` and `merges.txt` (required),
   * `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json` (optional), giving
   * them the same precedence as transformers v5 (`added_tokens_decoder` in tokenizer_config.json
   * wins; otherwise special_tokens_map.json overrides tokenizer_config.json).
   *
   * @throws {@link FileError} if the folder or a required file is missing, or a file is malformed.
   */
  static async fromFolder(dir: string): Promise<ClipTokenizer> {
    if (typeof dir !== 'string' || dir === '') throw new InvalidArgumentError('ClipTokenizer.fromFolder: dir must be a non-empty path.');
    let stat;
    try {
      stat = await fs.stat(dir);
    } catch (err) {
      throw new FileError(`Tokenizer folder ${dir} does not exist.`, dir, { cause: err });
    }
    if (!stat.isDirectory()) throw new FileError(`${dir} is not a folder; expected a tokenizer folder with vocab.json and merges.txt.`, dir);
    const need = 'a CLIP tokenizer folder needs vocab.json and merges.txt';
    const vocabFile = path.join(dir, 'vocab.json');
    const mergesFile = path.join(dir, 'merges.txt');
    const [vocabText, mergesText, configText, specialText, addedText] = await Promise.all([
      readTextFile(vocabFile, true, need),
      readTextFile(mergesFile, true, need),
      readTextFile(path.join(dir, 'tokenizer_config.json'), false, ''),
      readTextFile(path.join(dir, 'special_tokens_map.json'), false, ''),
      readTextFile(path.join(dir, 'added_tokens.json'), false, ''),
    ]);
    const vocab = parseJsonObject(vocabText!, vocabFile) as Record<string, number>;
    const merges = parseMerges(mergesText!, mergesFile);
    const json = (text: string | undefined, name: string) =>
      text === undefined ? undefined : parseJsonObject(text, path.join(dir, name));
    return new ClipTokenizer(
      {
        vocab,
        merges,
        tokenizerConfig: json(configText, 'tokenizer_config.json'),
        specialTokensMap: json(specialText, 'special_tokens_map.json'),
        addedTokens: json(addedText, 'added_tokens.json') as Record<string, number> | undefined,
      },
      dir,
    );
  }

  /**
   * Builds a tokenizer from already parsed folder contents (useful for tiny test vocabularies).
   *
   * @throws {@link FileError} if the contents are malformed (a merge using an unknown token, ...).
   */
  static fromObjects(files: ClipTokenizerFiles): ClipTokenizer {
    if (!isRecord(files)) throw new InvalidArgumentError('ClipTokenizer.fromObjects: expected { vocab, merges, ... }.');
    return new ClipTokenizer(files, '<in-memory tokenizer>');
  }

  /** Number of tokens, added tokens included (transformers' `len(tokenizer)`). */
  get vocabSize(): number {
    let n = this.vocab.size;
    for (const content of this.addedByContent.keys()) if (!this.vocab.has(content)) n++;
    return n;
  }

  /**
   * Adds tokens that are matched whole before BPE, as transformers' `tokenizer.add_tokens` does:
   * case-insensitively (they are `normalized`), anywhere in the text, also inside words
   * (`"a<new1>cat"` → `a`, `<new1>`, `cat`; `"<new1>s"` → `<new1>`, `s`).
   *
   * New tokens get ids from the vocabulary size upwards (49408, 49409, ... for CLIP); a token that
   * is already in the vocabulary keeps its id.
   *
   * @returns the id of each token, in order.
   * @throws {@link InvalidArgumentError} for an empty or non-string token.
   */
  addTokens(tokens: Array<string | AddedTokenSpec>): number[] {
    if (!Array.isArray(tokens)) throw new InvalidArgumentError('addTokens: expected an array of tokens.');
    const specs = tokens.map((t, i): AddedToken => {
      const spec: AddedTokenSpec = typeof t === 'string' ? { content: t } : t;
      if (!isRecord(spec) || typeof spec.content !== 'string' || spec.content === '') {
        throw new InvalidArgumentError(`addTokens: token #${i} must be a non-empty string, got ${JSON.stringify(t)}.`);
      }
      const special = spec.special ?? false;
      return {
        content: spec.content,
        singleWord: spec.singleWord ?? false,
        lstrip: spec.lstrip ?? false,
        rstrip: spec.rstrip ?? false,
        normalized: spec.normalized ?? !special,
        special,
      };
    });
    return this.addAddedTokens(specs);
  }

  /**
   * Takes back tokens added with {@link addTokens} (tokens of the vocabulary files and special tokens
   * stay), so the tokenizer splits their text as it did before. Unknown tokens are ignored.
   */
  removeAddedTokens(tokens: string[]): void {
    for (const content of tokens) {
      const id = this.addedByContent.get(content);
      if (id === undefined || this.vocab.has(content) || this.specialContents.has(content)) continue;
      this.addedByContent.delete(content);
      this.addedById.delete(id);
      this.addedNormalized.delete(id);
    }
    this.refreshMatchers();
  }

  /** tokenizers' `AddedVocabulary::add_tokens`. */
  private addAddedTokens(tokens: AddedToken[]): number[] {
    let maxAdded = -1;
    for (const id of this.addedById.keys()) maxAdded = Math.max(maxAdded, id);
    const modelSize = this.vocab.size;
    let nextId = maxAdded < 0 ? modelSize : maxAdded >= modelSize || modelSize === 0 ? maxAdded + 1 : modelSize;
    const ids: number[] = [];
    for (const token of tokens) {
      const existing = this.addedByContent.get(token.content);
      if (existing !== undefined && sameAddedToken(this.addedById.get(existing)!, token)) {
        ids.push(existing);
        continue;
      }
      let id = this.tokenId(token.content);
      if (id === undefined) {
        if (nextId >= MAX_ID) throw new InvalidArgumentError(`addTokens: too many tokens (ids must stay below ${MAX_ID}).`);
        id = nextId++;
      }
      this.addedNormalized.delete(id);
      if (token.normalized) {
        const normed = normalizeClipText(token.content);
        if (normed !== token.content) this.addedNormalized.set(id, normed);
      }
      this.addedByContent.set(token.content, id);
      if (token.special) this.specialContents.add(token.content);
      this.addedById.set(id, { ...token });
      ids.push(id);
    }
    this.refreshMatchers();
    return ids;
  }

  private refreshMatchers(): void {
    const raw: string[] = [];
    const normalized: string[] = [];
    for (const [id, token] of this.addedById) {
      if (token.normalized) normalized.push(this.addedNormalized.get(id) ?? token.content);
      else raw.push(token.content);
    }
    // Longest first: at the leftmost position the longest pattern wins (leftmost-longest).
    const build = (patterns: string[]) =>
      patterns.length === 0
        ? undefined
        : new RegExp([...new Set(patterns)].sort((a, b) => b.length - a.length).map(escapeRegExp).join('|'), 'gu');
    this.rawMatcher = build(raw);
    this.normalizedMatcher = build(normalized);
  }

  /** Id of an added token by its pattern text as matched in (raw or normalized) text. */
  private idOfMatch(text: string, normalized: boolean): number {
    for (const [id, token] of this.addedById) {
      if (token.normalized !== normalized) continue;
      if ((normalized ? this.addedNormalized.get(id) ?? token.content : token.content) === text) return id;
    }
    throw new Error(`internal: no added token for ${JSON.stringify(text)}`);
  }

  /**
   * tokenizers' `AddedVocabulary::find_matches`: splits `text` into added tokens (`id` set) and the
   * text between them.
   */
  private splitOnAdded(text: string, matcher: RegExp | undefined, normalized: boolean): Array<{ text: string; id?: number }> {
    if (matcher === undefined || text === '') return [{ text }];
    const out: Array<{ text: string; id?: number }> = [];
    let offset = 0;
    matcher.lastIndex = 0;
    for (let m = matcher.exec(text); m !== null; m = matcher.exec(text)) {
      let start = m.index;
      let stop = start + m[0].length;
      const id = this.idOfMatch(m[0], normalized);
      const token = this.addedById.get(id)!;
      if (token.singleWord) {
        const startOk = start === 0 || !ENDS_WITH_WORD.test(text.slice(0, start));
        const stopOk = stop === text.length || !STARTS_WITH_WORD.test(text.slice(stop));
        if (!startOk || !stopOk) continue;
      }
      if (token.lstrip) {
        const before = text.slice(0, start);
        start = Math.max(before.length - TRAILING_WS.exec(before)![0].length, offset);
      }
      if (token.rstrip) {
        // The search goes on from the end of the match itself, as in tokenizers.
        stop += LEADING_WS.exec(text.slice(stop))![0].length;
      }
      if (offset < start) out.push({ text: text.slice(offset, start) });
      out.push({ text: text.slice(start, stop), id });
      offset = stop;
    }
    if (offset !== text.length) out.push({ text: text.slice(offset) });
    return out;
  }

  /**
   * Content ids of `text`, without BOS/EOS, as `tokenizer(text, add_special_tokens=False).input_ids`.
   *
   * @throws {@link InvalidArgumentError} if `text` is not a string.
   */
  encode(text: string): number[] {
    if (typeof text !== 'string') throw new InvalidArgumentError(`encode: expected a string, got ${typeof text}.`);
    const ids: number[] = [];
    for (const piece of this.splitOnAdded(text, this.rawMatcher, false)) {
      if (piece.id !== undefined) {
        ids.push(piece.id);
        continue;
      }
      const normalized = normalizeClipText(piece.text);
      for (const part of this.splitOnAdded(normalized, this.normalizedMatcher, true)) {
        if (part.id !== undefined) ids.push(part.id);
        else this.encodeNormalized(part.text, ids);
      }
    }
    return ids;
  }

  /** Pre-tokenizes normalized text and appends the BPE ids of every word to `out`. */
  private encodeNormalized(text: string, out: number[]): void {
    CLIP_SPLIT.lastIndex = 0;
    for (let m = CLIP_SPLIT.exec(text); m !== null; m = CLIP_SPLIT.exec(text)) {
      const piece = m[0];
      BYTE_LEVEL_SPLIT.lastIndex = 0;
      let last = 0;
      // Isolated split: both the matches and any text between them become words.
      for (let w = BYTE_LEVEL_SPLIT.exec(piece); w !== null; w = BYTE_LEVEL_SPLIT.exec(piece)) {
        if (w.index > last) this.bpeWord(piece.slice(last, w.index), out);
        this.bpeWord(w[0], out);
        last = w.index + w[0].length;
        if (w[0].length === 0) BYTE_LEVEL_SPLIT.lastIndex++;
      }
      if (last < piece.length) this.bpeWord(piece.slice(last), out);
      if (piece.length === 0) CLIP_SPLIT.lastIndex++;
    }
  }

  /** Byte-level maps one pre-token and appends its BPE ids (cached). */
  private bpeWord(word: string, out: number[]): void {
    if (word === '') return;
    let ids = this.cache.get(word);
    if (ids === undefined) {
      const bytes = UTF8.encode(word);
      let chars = '';
      for (const b of bytes) chars += BYTE_TO_CHAR[b];
      ids = this.bpe(chars);
      if (this.cache.size >= CACHE_CAPACITY) this.cache.clear();
      this.cache.set(word, ids);
    }
    for (const id of ids) out.push(id);
  }

  /** tokenizers' `BPE::merge_word` + `Word::merge_all` (no dropout), on byte-level characters. */
  private bpe(chars: string): number[] {
    const units = Array.from(chars);
    const c: number[] = [];
    let unk: number | undefined;
    for (let i = 0; i < units.length; i++) {
      const s = i === units.length - 1 ? `${units[i]}</w>` : units[i];
      const id = this.vocab.get(s);
      if (id !== undefined) {
        if (unk !== undefined) {
          c.push(unk);
          unk = undefined;
        }
        c.push(id);
      } else if (this.unkToken !== undefined) {
        if (unk !== undefined) c.push(unk);
        unk = this.vocab.get(this.unkToken);
        if (unk === undefined) {
          throw new InvalidArgumentError(`The unknown token ${JSON.stringify(this.unkToken)} is not in vocab.json.`);
        }
      }
    }
    if (unk !== undefined) c.push(unk);
    const n = c.length;
    if (n < 2) return c;
    const prev = new Int32Array(n);
    const next = new Int32Array(n);
    const alive = new Uint8Array(n).fill(1);
    for (let i = 0; i < n; i++) {
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
    }
    const heap = new MergeHeap();
    for (let i = 0; i + 1 < n; i++) {
      const rank = this.mergeRanks.get(c[i] * MAX_ID + c[i + 1]);
      if (rank !== undefined) heap.push(rank, i, this.mergeNewIds[rank]);
    }
    const top: [number, number, number] = [0, 0, 0];
    while (heap.size > 0) {
      heap.pop(top);
      const pos = top[1];
      const newId = top[2];
      if (!alive[pos] || next[pos] === -1) continue;
      const right = next[pos];
      // Skip expired entries: the pair at `pos` must still merge into the same token.
      const rank = this.mergeRanks.get(c[pos] * MAX_ID + c[right]);
      if (rank === undefined || this.mergeNewIds[rank] !== newId) continue;
      c[pos] = newId;
      next[pos] = next[right];
      alive[right] = 0;
      if (next[right] !== -1) prev[next[right]] = pos;
      if (prev[pos] >= 0) {
        const p = prev[pos];
        const r = this.mergeRanks.get(c[p] * MAX_ID + c[pos]);
        if (r !== undefined) heap.push(r, p, this.mergeNewIds[r]);
      }
      if (next[pos] !== -1) {
        const r = this.mergeRanks.get(c[pos] * MAX_ID + c[next[pos]]);
        if (r !== undefined) heap.push(r, pos, this.mergeNewIds[r]);
      }
    }
    const result: number[] = [];
    for (let i = 0; i < n; i++) if (alive[i]) result.push(c[i]);
    return result;
  }

  /**
   * The tokens of `text` (BPE tokens carry `</w>` at word ends), as `tokenizer.tokenize(text)`.
   *
   * @throws {@link InvalidArgumentError} if `text` is not a string.
   */
  tokenize(text: string): string[] {
    return this.encode(text).map((id) => this.idToToken(id)!);
  }

  /**
   * Encodes a batch as `tokenizer(texts, padding=..., truncation=..., max_length=...).input_ids`:
   * BOS + content + EOS; with `truncation` at most `maxLength - 2` content ids are kept; padding
   * appends the pad token on the right.
   *
   * @throws {@link InvalidArgumentError} on a non-string text, a bad option, or padding without a pad token.
   */
  encodeBatch(texts: string[], options: EncodeBatchOptions = {}): number[][] {
    if (!Array.isArray(texts)) throw new InvalidArgumentError('encodeBatch: expected an array of strings.');
    const padding = options.padding ?? 'do_not_pad';
    if (!['max_length', 'longest', 'do_not_pad'].includes(padding)) {
      throw new InvalidArgumentError(`encodeBatch: padding must be 'max_length', 'longest' or 'do_not_pad', got ${JSON.stringify(padding)}.`);
    }
    const truncation = options.truncation ?? false;
    const addSpecial = options.addSpecialTokens ?? true;
    const maxLength = options.maxLength ?? this.modelMaxLength;
    const nSpecial = addSpecial ? 2 : 0;
    if (!Number.isInteger(maxLength) || maxLength < nSpecial) {
      throw new InvalidArgumentError(`encodeBatch: maxLength must be an integer >= ${nSpecial}, got ${maxLength}.`);
    }
    const rows = texts.map((text, i) => {
      if (typeof text !== 'string') throw new InvalidArgumentError(`encodeBatch: texts[${i}] is not a string.`);
      let ids = this.encode(text);
      if (truncation && ids.length > maxLength - nSpecial) ids = ids.slice(0, maxLength - nSpecial);
      return addSpecial ? [this.bosTokenId, ...ids, this.eosTokenId] : ids;
    });
    if (padding === 'do_not_pad') return rows;
    const target = padding === 'max_length' ? maxLength : Math.max(0, ...rows.map((r) => r.length));
    if (this.padTokenId === undefined) {
      throw new InvalidArgumentError('encodeBatch: this tokenizer has no pad token, so it cannot pad.');
    }
    for (const row of rows) while (row.length < target) row.push(this.padTokenId);
    return rows;
  }

  /**
   * Id of a token string: an added token (by the text it was added with) or a raw vocabulary entry
   * (`tokenId('ktn')` = 42170, `tokenId('photo</w>')` = 1125); `undefined` if unknown.
   */
  tokenId(token: string): number | undefined {
    return this.addedByContent.get(token) ?? this.vocab.get(token);
  }

  /** Token string of an id (added tokens by their normalized text), `undefined` if unknown. */
  idToToken(id: number): string | undefined {
    const added = this.addedById.get(id);
    if (added !== undefined) return this.addedNormalized.get(id) ?? added.content;
    return this.modelTokens.get(id);
  }

  /**
   * Decodes ids to text as transformers does: byte-level decoding, `</w>` → space, strip.
   * Unknown ids are skipped.
   *
   * @throws {@link InvalidArgumentError} if an id is not a non-negative integer.
   */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    if (!Array.isArray(ids)) throw new InvalidArgumentError('decode: expected an array of ids.');
    const bytes: number[] = [];
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0) throw new InvalidArgumentError(`decode: invalid token id ${id}.`);
      const token = this.idToToken(id);
      if (token === undefined) continue;
      if (options.skipSpecialTokens && this.specialContents.has(token)) continue;
      const chars = Array.from(token);
      if (chars.every((ch) => CHAR_TO_BYTE.has(ch))) for (const ch of chars) bytes.push(CHAR_TO_BYTE.get(ch)!);
      else for (const b of UTF8.encode(token)) bytes.push(b);
    }
    return UTF8_LOSSY.decode(Uint8Array.from(bytes)).split('</w>').join(' ').replace(PY_STRIP, '');
  }
}
