/**
 * Parity of ClipTokenizer with Hugging Face transformers' CLIPTokenizer.
 *
 * The expected ids come from test/fixtures/tokenizer/expected.json, written by
 * test/parity/make_tokenizer_fixtures.py (transformers v5); no Python is needed here.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ClipTokenizer } from '../../src/model/tokenizer';
import { FileError, InvalidArgumentError } from '../../src/errors';

const FIXTURES = path.join(__dirname, '..', 'fixtures');

interface Variant {
  folder: string;
  vocabSize: number;
  bosTokenId: number;
  eosTokenId: number;
  padTokenId: number;
  modelMaxLength: number;
  padded: number[][];
  unpadded: number[][];
  added: { ids: number[]; vocabSize: number; rows: number[]; padded: number[][]; unpadded: number[][] };
}

interface Expected {
  transformers: string;
  maxLength: number;
  addedTokens: string[];
  prompts: string[];
  variants: Record<string, Variant>;
  tokens: string[][];
  decoded: string[];
  decodedSkip: string[];
  rawVocab: Record<string, number>;
}

const expected: Expected = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'tokenizer', 'expected.json'), 'utf8'));
const prompts = expected.prompts;

/** Rows that differ, reported with their prompt so that a failure is readable. */
function mismatches<T>(got: T[], want: T[], indices?: number[]): Array<{ i: number; prompt: string; want: T; got: T }> {
  const out: Array<{ i: number; prompt: string; want: T; got: T }> = [];
  want.forEach((w, k) => {
    const i = indices ? indices[k] : k;
    if (JSON.stringify(got[k]) !== JSON.stringify(w)) out.push({ i, prompt: prompts[i], want: w, got: got[k] });
  });
  return out.slice(0, 5);
}

const load = (folder: string) => ClipTokenizer.fromFolder(path.join(FIXTURES, folder));

test('the corpus is large enough', () => {
  expect(prompts.length).toBeGreaterThanOrEqual(250);
  expect(Object.keys(expected.variants).sort()).toEqual(['sd1', 'sd2', 'small']);
});

describe.each(Object.entries(expected.variants))('parity with transformers %s', (name, v) => {
  let tok: ClipTokenizer;
  let withAdded: ClipTokenizer;

  beforeAll(async () => {
    tok = await load(v.folder);
    withAdded = await load(v.folder);
    expect(withAdded.addTokens(expected.addedTokens)).toEqual(v.added.ids);
  });

  test('special ids and sizes', () => {
    expect(tok.vocabSize).toBe(v.vocabSize);
    expect(tok.bosTokenId).toBe(v.bosTokenId);
    expect(tok.eosTokenId).toBe(v.eosTokenId);
    expect(tok.padTokenId).toBe(v.padTokenId);
    expect(tok.modelMaxLength).toBe(v.modelMaxLength);
    expect(withAdded.vocabSize).toBe(v.added.vocabSize);
  });

  test(`padded + truncated ids of all prompts (${name})`, () => {
    const got = tok.encodeBatch(prompts, { padding: 'max_length', truncation: true, maxLength: expected.maxLength });
    expect(mismatches(got, v.padded)).toEqual([]);
  });

  test(`unpadded ids of all prompts (${name})`, () => {
    const got = tok.encodeBatch(prompts);
    expect(mismatches(got, v.unpadded)).toEqual([]);
    // encode() is the same without BOS/EOS.
    expect(mismatches(prompts.map((p) => tok.encode(p)), v.unpadded.map((r) => r.slice(1, -1)))).toEqual([]);
  });

  test(`ids with <new1>, <new2> added (${name})`, () => {
    const padded = withAdded.encodeBatch(prompts, { padding: 'max_length', truncation: true, maxLength: 77 });
    const unpadded = withAdded.encodeBatch(prompts);
    const rows = new Set(v.added.rows);
    expect(v.added.rows.length).toBeGreaterThan(30);
    expect(mismatches(v.added.rows.map((i) => padded[i]), v.added.padded, v.added.rows)).toEqual([]);
    expect(mismatches(v.added.rows.map((i) => unpadded[i]), v.added.unpadded, v.added.rows)).toEqual([]);
    // Every other prompt tokenizes as without the added tokens.
    const others = prompts.map((_, i) => i).filter((i) => !rows.has(i));
    expect(mismatches(others.map((i) => padded[i]), others.map((i) => v.padded[i]), others)).toEqual([]);
    expect(mismatches(others.map((i) => unpadded[i]), others.map((i) => v.unpadded[i]), others)).toEqual([]);
  });
});

describe('sd1 tokens, decode and raw vocabulary', () => {
  let tok: ClipTokenizer;
  beforeAll(async () => {
    tok = await load('clip-tokenizer');
    tok.addTokens(expected.addedTokens);
  });

  test('tokenize() equals transformers tokenize()', () => {
    expect(mismatches(prompts.map((p) => tok.tokenize(p)), expected.tokens)).toEqual([]);
  });

  test('decode() equals transformers decode()', () => {
    const unpadded = tok.encodeBatch(prompts);
    expect(mismatches(unpadded.map((ids) => tok.decode(ids)), expected.decoded)).toEqual([]);
    expect(mismatches(unpadded.map((ids) => tok.decode(ids, { skipSpecialTokens: true })), expected.decodedSkip)).toEqual([]);
  });

  test('raw vocabulary lookups', () => {
    expect(expected.rawVocab).toMatchObject({ ktn: 42170, pll: 47629, ucd: 44746, 'photo</w>': 1125, '!': 0 });
    for (const [token, id] of Object.entries(expected.rawVocab)) expect(tok.tokenId(token)).toBe(id);
    expect(tok.tokenId('no-such-token')).toBeUndefined();
    expect(tok.idToToken(42170)).toBe('ktn');
    // "ktn" as text is two BPE tokens, not the raw vocabulary entry.
    expect(tok.encode('ktn')).not.toEqual([42170]);
  });
});

describe('added tokens', () => {
  let tok: ClipTokenizer;
  beforeEach(async () => {
    tok = await load('clip-tokenizer');
  });

  test('ids from the vocabulary size upwards, matched whole before BPE', () => {
    expect(tok.addTokens(['<new1>', '<new2>'])).toEqual([49408, 49409]);
    expect(tok.vocabSize).toBe(49410);
    expect(tok.tokenId('<new1>')).toBe(49408);
    expect(tok.encode('photo of a <new1> cat')).toEqual([1125, 539, 320, 49408, 2368]);
    expect(tok.encode('a<new1>cat')).toEqual([320, 49408, 2368]);
    expect(tok.encode('<new1>s')).toEqual([49408, 338]);
    expect(tok.encode('<new1><new2>')).toEqual([49408, 49409]);
    // Added tokens are normalized: matched case-insensitively.
    expect(tok.encode('<NEW1>')).toEqual([49408]);
    expect(tok.tokenize('a<new1>cat')).toEqual(['a</w>', '<new1>', 'cat</w>']);
    expect(tok.decode(tok.encodeBatch(['a <new1> cat'])[0], { skipSpecialTokens: true })).toBe('a <new1>cat');
  });

  test('adding again is a no-op; a vocabulary token keeps its id', () => {
    tok.addTokens(['<new1>']);
    expect(tok.addTokens(['<new1>'])).toEqual([49408]);
    expect(tok.vocabSize).toBe(49409);
    expect(tok.addTokens(['ktn'])).toEqual([42170]);
    expect(tok.vocabSize).toBe(49409);
    expect(tok.encode('ktn')).toEqual([42170]);
  });

  test('invalid tokens are rejected', () => {
    expect(() => tok.addTokens([''])).toThrow(InvalidArgumentError);
    expect(() => tok.addTokens([42 as unknown as string])).toThrow(InvalidArgumentError);
  });

  test('special tokens in the text', () => {
    // <|endoftext|> is matched in the raw text; in SD1 it is not normalized, so the upper-case form is BPE-encoded.
    expect(tok.encode('x<|endoftext|>y')).toEqual([343, 49407, 344]);
    expect(tok.encode('<|ENDOFTEXT|>')).not.toContain(49407);
    expect(tok.encode('<|STARTOFTEXT|>')).toEqual([49406]);
  });
});

describe('truncation and padding', () => {
  let sd1: ClipTokenizer;
  let sd2: ClipTokenizer;
  beforeAll(async () => {
    sd1 = await load('clip-tokenizer');
    sd2 = await load('clip-tokenizer-sd2');
  });

  test('SD1 pads with <|endoftext|>, SD2 with "!" (id 0)', () => {
    expect(sd1.padTokenId).toBe(49407);
    expect(sd2.padTokenId).toBe(0);
    const [a] = sd1.encodeBatch(['a photo of a cat'], { padding: 'max_length' });
    const [b] = sd2.encodeBatch(['a photo of a cat'], { padding: 'max_length' });
    expect(a.slice(0, 7)).toEqual([49406, 320, 1125, 539, 320, 2368, 49407]);
    expect(a).toHaveLength(77);
    expect(a.slice(7).every((id) => id === 49407)).toBe(true);
    expect(b.slice(0, 7)).toEqual(a.slice(0, 7));
    expect(b.slice(7).every((id) => id === 0)).toBe(true);
  });

  test('SD2 turns every "!" into its special pad token, as transformers does', () => {
    expect(sd1.encode('hello!')).toEqual([3306, 256]);
    expect(sd2.encode('hello!')).toEqual([3306, 0]);
    expect(sd2.encode('wow!!!')).toEqual([2781, 0, 0, 0]);
  });

  test('truncation keeps BOS + 75 content ids + EOS', () => {
    const text = 'photo of a cat '.repeat(30);
    const content = sd1.encode(text);
    expect(content.length).toBe(120);
    const [row] = sd1.encodeBatch([text], { padding: 'max_length', truncation: true, maxLength: 77 });
    expect(row).toEqual([49406, ...content.slice(0, 75), 49407]);
    const [untruncated] = sd1.encodeBatch([text], { padding: 'max_length' });
    expect(untruncated).toHaveLength(122);
    const [short] = sd1.encodeBatch([text], { truncation: true, maxLength: 10 });
    expect(short).toEqual([49406, ...content.slice(0, 8), 49407]);
  });

  test('longest padding and no special tokens', () => {
    const rows = sd1.encodeBatch(['a', 'a photo of a cat'], { padding: 'longest' });
    expect(rows).toEqual([
      [49406, 320, 49407, 49407, 49407, 49407, 49407],
      [49406, 320, 1125, 539, 320, 2368, 49407],
    ]);
    expect(sd1.encodeBatch(['a cat'], { addSpecialTokens: false })).toEqual([[320, 2368]]);
  });

  test('bad arguments', () => {
    expect(() => sd1.encodeBatch(['a'], { maxLength: 1, truncation: true })).toThrow(InvalidArgumentError);
    expect(() => sd1.encodeBatch(['a'], { padding: 'nope' as 'longest' })).toThrow(InvalidArgumentError);
    expect(() => sd1.encodeBatch('a' as unknown as string[])).toThrow(InvalidArgumentError);
    expect(() => sd1.encodeBatch([3 as unknown as string])).toThrow(InvalidArgumentError);
    expect(() => sd1.encode(undefined as unknown as string)).toThrow(InvalidArgumentError);
    expect(() => sd1.decode([-1])).toThrow(InvalidArgumentError);
  });
});

describe('small tokenizer', () => {
  test('1514 ids, specials last', async () => {
    const tok = await load('clip-tokenizer-small');
    expect(tok.vocabSize).toBe(1514);
    expect(tok.bosTokenId).toBe(1512);
    expect(tok.eosTokenId).toBe(1513);
    expect(tok.padTokenId).toBe(1513);
    expect(tok.addTokens(['<new1>'])).toEqual([1514]);
    const ids = tok.encode('a photo of a <new1> cat');
    expect(ids).toContain(1514);
    expect(Math.max(...ids)).toBeLessThanOrEqual(1514);
  });
});

describe('loading errors', () => {
  let tmp: string;
  const small = path.join(FIXTURES, 'clip-tokenizer-small');

  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'clip-tok-'));
    for (const f of fs.readdirSync(small)) fs.copyFileSync(path.join(small, f), path.join(tmp, f));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

  test('the copied folder loads', async () => {
    await expect(ClipTokenizer.fromFolder(tmp)).resolves.toBeInstanceOf(ClipTokenizer);
  });

  test('missing folder', async () => {
    await expect(ClipTokenizer.fromFolder(path.join(tmp, 'nope'))).rejects.toThrow(FileError);
    await expect(ClipTokenizer.fromFolder(path.join(tmp, 'vocab.json'))).rejects.toThrow(/not a folder/);
    await expect(ClipTokenizer.fromFolder('')).rejects.toThrow(InvalidArgumentError);
  });

  test('missing vocab.json or merges.txt', async () => {
    fs.rmSync(path.join(tmp, 'vocab.json'));
    await expect(ClipTokenizer.fromFolder(tmp)).rejects.toThrow(/Missing vocab\.json/);
    await expect(ClipTokenizer.fromFolder(tmp)).rejects.toThrow(FileError);
  });

  test('missing merges.txt', async () => {
    fs.rmSync(path.join(tmp, 'merges.txt'));
    await expect(ClipTokenizer.fromFolder(tmp)).rejects.toThrow(/Missing merges\.txt/);
  });

  test('corrupt merges: a line without exactly two tokens', async () => {
    const file = path.join(tmp, 'merges.txt');
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    lines[5] = 'a b c';
    fs.writeFileSync(file, lines.join('\n'));
    const err = await ClipTokenizer.fromFolder(tmp).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FileError);
    expect((err as FileError).message).toMatch(/malformed merge on line 6/);
    expect((err as FileError).file).toBe(file);
  });

  test('corrupt merges: a token that is not in the vocabulary', async () => {
    fs.appendFileSync(path.join(tmp, 'merges.txt'), 'zzq xyw\n');
    await expect(ClipTokenizer.fromFolder(tmp)).rejects.toThrow(/not in vocab\.json/);
  });

  test('corrupt vocab.json', async () => {
    fs.writeFileSync(path.join(tmp, 'vocab.json'), '{"a": 0,');
    await expect(ClipTokenizer.fromFolder(tmp)).rejects.toThrow(/not valid JSON/);
    fs.writeFileSync(path.join(tmp, 'vocab.json'), '{"a": -1}');
    await expect(ClipTokenizer.fromFolder(tmp)).rejects.toThrow(FileError);
  });

  test('corrupt tokenizer_config.json', async () => {
    fs.writeFileSync(path.join(tmp, 'tokenizer_config.json'), '[1, 2]');
    await expect(ClipTokenizer.fromFolder(tmp)).rejects.toThrow(/JSON object/);
  });

  test('optional files may be absent; added_tokens.json is honoured', async () => {
    fs.rmSync(path.join(tmp, 'tokenizer_config.json'));
    fs.rmSync(path.join(tmp, 'special_tokens_map.json'));
    fs.writeFileSync(path.join(tmp, 'added_tokens.json'), JSON.stringify({ '<new1>': 1514 }));
    const tok = await ClipTokenizer.fromFolder(tmp);
    expect(tok.modelMaxLength).toBe(77);
    expect(tok.padTokenId).toBe(1513);
    expect(tok.encode('a<NEW1>')).toEqual([...tok.encode('a'), 1514]);
  });
});

test('fromObjects builds a tiny tokenizer', () => {
  const dir = path.join(FIXTURES, 'clip-tokenizer-small');
  const tok = ClipTokenizer.fromObjects({
    vocab: JSON.parse(fs.readFileSync(path.join(dir, 'vocab.json'), 'utf8')),
    merges: fs.readFileSync(path.join(dir, 'merges.txt'), 'utf8'),
  });
  expect(tok.vocabSize).toBe(1514);
  expect(tok.encodeBatch(['hi'])[0][0]).toBe(1512);
  expect(() => ClipTokenizer.fromObjects({ vocab: {}, merges: '' })).toThrow(FileError);
});

describe('configuration precedence (values checked against transformers v5)', () => {
  let tmp: string;
  const sd2 = path.join(FIXTURES, 'clip-tokenizer-sd2');
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'clip-tok-'));
    for (const f of fs.readdirSync(sd2)) fs.copyFileSync(path.join(sd2, f), path.join(tmp, f));
  });
  afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const editConfig = (edit: (c: Record<string, unknown>) => void) => {
    const file = path.join(tmp, 'tokenizer_config.json');
    const config = JSON.parse(fs.readFileSync(file, 'utf8'));
    edit(config);
    fs.writeFileSync(file, JSON.stringify(config));
  };

  test('special_tokens_map.json overrides tokenizer_config.json', async () => {
    editConfig((c) => {
      c.pad_token = '<|endoftext|>';
    });
    const tok = await ClipTokenizer.fromFolder(tmp);
    expect(tok.padTokenId).toBe(0);
    expect(tok.encodeBatch(['hi!'])).toEqual([[49406, 1883, 0, 49407]]);
  });

  test('added_tokens_decoder in tokenizer_config.json wins and special_tokens_map.json is ignored', async () => {
    const added = (content: string) => ({ content, lstrip: false, normalized: true, rstrip: false, single_word: false, special: true });
    editConfig((c) => {
      c.pad_token = '<|endoftext|>';
      c.added_tokens_decoder = { '49406': added('<|startoftext|>'), '49407': added('<|endoftext|>') };
    });
    const tok = await ClipTokenizer.fromFolder(tmp);
    expect(tok.padTokenId).toBe(49407);
    // "!" is no special token here, and the normalized <|endoftext|> also matches in upper case.
    expect(tok.encodeBatch(['hi! <|ENDOFTEXT|>'])).toEqual([[49406, 1883, 256, 49407, 49407]]);
  });
});
