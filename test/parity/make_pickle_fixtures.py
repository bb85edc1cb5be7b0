#!/usr/bin/env python3
"""Writes the torch.save fixtures of test/core/torch-file.test.ts into test/fixtures/pickle/.

Three groups:
  * good/      real torch.save archives (plus a few repacked ones: ZIP64, another archive name,
               unaligned entries, big-endian) and, in expected.json, for each of them the sha256 of
               every tensor's bytes, its dtype and shape, and the whole tree's structure, so the tests
               need no Python.
  * unsafe/    pickles that would run code in Python's pickle (os.system, eval, __import__,
               subprocess.Popen, ...). Loading must refuse them with PICKLE_UNSAFE; the command they
               carry would create MARKER below, which the test checks never appears.
  * corrupt/   damaged archives and pickles. Loading must fail with PICKLE_FORMAT, never crash.

Run: python3 test/parity/make_pickle_fixtures.py   (rewrites test/fixtures/pickle/ completely)
Nothing here is ever unpickled by Python: the malicious files are only written.
"""
import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types
import zipfile
import zlib

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures', 'pickle')
# What the malicious pickles would create if a loader ran them (the test checks it never exists).
MARKER = '/tmp/custom-diffusion-pickle-fixture-pwned-5b1e07'
SHELL = f'echo pwned > {MARKER}'


def gen(name):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return g


def randn(name, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(name)).to(dtype)


# ------------------------------------------------------------------------------------------------
# Structure of a tree as the JS loader must show it (mirrors native/core/bind_pickle.cc).

def qualname(obj):
    mod = getattr(obj, '__module__', None) or 'builtins'
    if mod == '__builtin__':
        mod = 'builtins'
    return f"{mod}.{getattr(obj, '__qualname__', obj.__name__)}"


def key_text(k):
    if isinstance(k, str):
        return k
    if isinstance(k, bool):
        return 'True' if k else 'False'
    if isinstance(k, int):
        return str(k)
    if k is None:
        return 'None'
    if isinstance(k, type):
        return qualname(k)
    if isinstance(k, tuple):
        inner = ', '.join(key_text(x) for x in k)
        return f'({inner},)' if len(k) == 1 else f'({inner})'
    raise TypeError(f'unsupported key {k!r}')


def tensor_record(t):
    t = t.detach()
    rec = {'dtype': str(t.dtype).replace('torch.', ''), 'shape': list(t.shape)}
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        rec['dtype'] = {torch.float8_e4m3fn: 'Float8_e4m3fn', torch.float8_e5m2: 'Float8_e5m2'}[t.dtype]
        rec['sha256_as_float32'] = hashlib.sha256(t.float().contiguous().numpy().tobytes()).hexdigest()
    else:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b''
        rec['sha256'] = hashlib.sha256(raw).hexdigest()
    return rec


def structure(x):
    if isinstance(x, torch.Tensor):
        return {'__tensor__': tensor_record(x)}
    if x is None or type(x) in (bool, str):
        return x
    if type(x) is int:
        if abs(x) < 2 ** 53:
            return x
        if -2 ** 63 <= x < 2 ** 63:
            return {'__bigint__': str(x)}
        return {'__opaque__': 'builtins.int'}
    if type(x) is float:
        return x
    if type(x) is bytes:
        return {'__bytes__': x.hex()}
    if isinstance(x, (list, tuple, set, frozenset)) and type(x) in (list, tuple, set, frozenset):
        return [structure(v) for v in x]
    if type(x) in (dict, collections.OrderedDict):
        return {'__dict__': [[key_text(k), structure(v)] for k, v in x.items()]}
    if isinstance(x, type):
        return {'__opaque__': qualname(x)}
    if isinstance(x, torch.dtype):
        return {'__opaque__': str(x)}
    reduced = x.__reduce_ex__(2)
    fn = reduced[0]
    if getattr(fn, '__name__', '') == '__newobj__':
        return {'__opaque__': qualname(reduced[1][0])}
    return {'__opaque__': qualname(fn)}


def flat_tensors(x, prefix=''):
    out = {}
    if isinstance(x, torch.Tensor):
        out[prefix] = tensor_record(x)
    elif type(x) in (dict, collections.OrderedDict):
        for k, v in x.items():
            out.update(flat_tensors(v, f'{prefix}.{key_text(k)}' if prefix else key_text(k)))
    return out


# ------------------------------------------------------------------------------------------------
# A small ZIP writer (stored entries, 64-byte aligned data like torch's), used to repack archives:
# with ZIP64 records and extra fields, another archive name, misaligned data, or changed entries.

def write_zip(path, entries, zip64=False, align=64):
    out = bytearray()
    central = []
    for name, data in entries:
        nb = name.encode()
        crc = zlib.crc32(data) & 0xffffffff
        offset = len(out)
        extra = b''
        if zip64:
            extra += struct.pack('<HHQQ', 0x0001, 16, len(data), len(data))
        if align:
            base = offset + 30 + len(nb) + len(extra) + 4
            pad = (-base) % align
            extra += struct.pack('<HH', 0x4246, pad) + b'Z' * pad
        size32 = 0xffffffff if zip64 else len(data)
        out += struct.pack('<IHHHHHIIIHH', 0x04034b50, 45 if zip64 else 20, 0, 0, 0, 0x21, crc, size32, size32,
                           len(nb), len(extra))
        out += nb + extra + data
        central.append((nb, crc, len(data), offset))
    cd_start = len(out)
    for nb, crc, size, offset in central:
        if zip64:
            extra = struct.pack('<HHQQQ', 0x0001, 24, size, size, offset)
            out += struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 45, 45, 0, 0, 0, 0x21, crc, 0xffffffff,
                               0xffffffff, len(nb), len(extra), 0, 0, 0, 0, 0xffffffff)
        else:
            extra = b''
            out += struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, 0, 0, 0x21, crc, size, size, len(nb),
                               0, 0, 0, 0, 0, offset)
        out += nb + extra
    cd_size = len(out) - cd_start
    n = len(central)
    if zip64:
        eocd64 = len(out)
        out += struct.pack('<IQHHIIQQQQ', 0x06064b50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start)
        out += struct.pack('<IIQI', 0x07064b50, 0, eocd64, 1)
        out += struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, 0xffff, 0xffff, 0xffffffff, 0xffffffff, 0)
    else:
        out += struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, n, n, cd_size, cd_start, 0)
    with open(path, 'wb') as f:
        f.write(out)


def read_entries(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def torch_save_bytes(obj, **kw):
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# A tiny pickle assembler for the hand-made malicious and corrupt pickles.

def op_global(module, name):
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def op_str(s):
    b = s.encode()
    return b'X' + struct.pack('<I', len(b)) + b


def op_short(s):
    b = s.encode()
    return b'\x8c' + bytes([len(b)]) + b


def op_int(i):
    return b'J' + struct.pack('<i', i)


def storage_pid(key, cls='FloatStorage', numel=4):
    return (b'(' + op_str('storage') + op_global('torch', cls) + op_str(key) + op_str('cpu') + op_int(numel) +
            b'tQ')


def archive_with_pickle(path, pkl, storages=(), name='archive'):
    """A torch-like archive whose data.pkl is `pkl` (storages: list of (key, bytes))."""
    entries = [(f'{name}/data.pkl', pkl), (f'{name}/byteorder', b'little')]
    entries += [(f'{name}/data/{k}', v) for k, v in storages]
    entries += [(f'{name}/version', b'3\n')]
    write_zip(path, entries)


# ------------------------------------------------------------------------------------------------
# Fake Lightning classes, registered under their real module names so pickle writes those names.

def fake_module(name):
    parts = name.split('.')
    for i in range(1, len(parts) + 1):
        sub = '.'.join(parts[:i])
        if sub not in sys.modules:
            sys.modules[sub] = types.ModuleType(sub)
            if i > 1:
                setattr(sys.modules['.'.join(parts[:i - 1])], parts[i - 1], sys.modules[sub])
    return sys.modules[name]


mc = fake_module('pytorch_lightning.callbacks.model_checkpoint')
ModelCheckpoint = type('ModelCheckpoint', (), {'__module__': mc.__name__})
mc.ModelCheckpoint = ModelCheckpoint
pu = fake_module('pytorch_lightning.utilities.parsing')
AttributeDict = type('AttributeDict', (dict,), {'__module__': pu.__name__})
pu.AttributeDict = AttributeDict


class Exploit:
    """The classic: unpickling calls fn(*args)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ------------------------------------------------------------------------------------------------

def good_fixtures(d):
    """name → object saved with torch.save (kwargs in a tuple when needed)."""
    base = randn('base', 4, 6)
    shared = randn('shared', 3)
    f = {}
    f['dtypes.pt'] = {
        'f32': randn('f32', 2, 3),
        'f16': randn('f16', 2, 3, dtype=torch.float16),
        'bf16': randn('bf16', 3, 2, dtype=torch.bfloat16),
        'f64': randn('f64', 5, dtype=torch.float64),
        'i64': torch.tensor([-(2 ** 62), -1, 0, 7, 2 ** 62], dtype=torch.int64),
        'i32': torch.tensor([[-(2 ** 31), 0], [5, 2 ** 31 - 1]], dtype=torch.int32),
        'i16': torch.tensor([-32768, -3, 32767], dtype=torch.int16),
        'i8': torch.tensor([-128, 0, 127], dtype=torch.int8),
        'u8': torch.tensor([0, 1, 255, 128], dtype=torch.uint8),
        'bool': torch.tensor([[True, False, True]]),
        'base': base,
        'transposed': base.t(),              # strides (1, 6), shares `base`'s storage
        'column': base[:, 2],                # offset 2, stride 6
        'rows': base[1:3],                   # offset 6, contiguous
        'scalar': torch.tensor(3.25),        # 0-dim
        'empty': torch.zeros(0, 3),
        'empty_i64': torch.zeros(2, 0, dtype=torch.int64),
        'expanded': shared.unsqueeze(0).expand(2, 3),  # stride 0
    }
    f['values.pt'] = {
        'int': 42, 'neg': -7, 'big': 2 ** 40, 'i64max': 2 ** 63 - 1, 'i64min': -2 ** 63, 'huge': 2 ** 80,
        'float': 0.1, 'nan_free': -1.5e-300, 'str': 'ünïcødé ✓', 'none': None, 't': True, 'f': False,
        'list': [1, 'two', [3.0]], 'tuple': (1, (2,)), 'bytes': b'\x00\x01\xff', 'empty_bytes': b'',
        'set': {5}, 'int_keys': {0: 'a', 1: 'b'}, 'tuple_key': {(1, 'x'): 1},
        '__proto__': 'not a prototype', 'dotted.key': torch.ones(1),
    }
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(randn('lin.w', 2, 3))
        lin.bias.copy_(randn('lin.b', 2))
    seq = torch.nn.Sequential(lin, torch.nn.LayerNorm(2))
    f['ordered.pt'] = seq.state_dict()  # OrderedDict with _metadata (BUILD)
    f['parameters.pt'] = {
        'weight': torch.nn.Parameter(randn('p.w', 2, 2)),
        'frozen': torch.nn.Parameter(randn('p.f', 3), requires_grad=False),
        'params': list(lin.parameters()),
    }
    attn = ['down_blocks.0.attentions.0', 'up_blocks.3.attentions.2', 'mid_block.attentions.0']
    unet = {}
    for p in attn:
        for kv in ('k', 'v'):
            unet[f'{p}.transformer_blocks.0.attn2.to_{kv}.weight'] = randn(f'adf.{p}.{kv}', 8, 4)
    f['delta.bin'] = {'unet': unet, 'modifier_token': {'<new1>': randn('tok1', 32), '<new2>': randn('tok2', 32)}}
    compvis = ['input_blocks.1.1', 'output_blocks.11.1', 'middle_block.1']
    sd = {}
    for p in compvis:
        for kv in ('k', 'v'):
            sd[f'model.diffusion_model.{p}.transformer_blocks.0.attn2.to_{kv}.weight'] = randn(f'acv.{p}.{kv}', 8, 4)
    f['delta_epoch=000004.ckpt'] = {'state_dict': sd, 'embed': randn('embed', 1, 32)}
    comp = {}
    for p in attn[:2]:
        for kv in ('k', 'v'):
            comp[f'{p}.transformer_blocks.0.attn2.to_{kv}.weight'] = {'u': randn(f'u.{p}.{kv}', 8, 2),
                                                                      'v': randn(f'v.{p}.{kv}', 2, 4)}
    comp[f'{attn[0]}.transformer_blocks.0.attn2.to_q.weight'] = randn('q.full', 8, 8)
    f['compressed_delta.bin'] = {'unet': comp, 'modifier_token': {'<new1>': randn('ctok', 32)}}
    cdw = {}
    for p in attn:
        cdw[f'{p}.transformer_blocks.0.attn1.processor'] = {}
        cdw[f'{p}.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight'] = randn(f'cdw.{p}.k', 8, 4)
        cdw[f'{p}.transformer_blocks.0.attn2.processor.to_v_custom_diffusion.weight'] = randn(f'cdw.{p}.v', 8, 4)
    f['pytorch_custom_diffusion_weights.bin'] = cdw
    f['protocol5.pt'] = ({'w': randn('p5', 3, 2), 'nested': {'x': randn('p5x', 2)}, 'n': 3}, {'pickle_protocol': 5})
    hp = argparse.Namespace(lr=1e-5, name='cat')
    ad = AttributeDict(lr=2e-5, modifier_token='<new1>')
    f['lightning.ckpt'] = {
        'epoch': 3, 'global_step': 1000, 'pytorch-lightning_version': '1.4.2',
        'state_dict': {'model.diffusion_model.out.2.bias': randn('lt.bias', 4),
                       'cond_stage_model.transformer.text_model.embeddings.token_embedding.weight': randn('lt.emb', 6, 4)},
        'callbacks': {ModelCheckpoint: {'monitor': 'val/loss', 'best_model_score': torch.tensor(0.125),
                                        'best_model_path': 'logs/last.ckpt', 'np_score': np.float64(0.5)}},
        'optimizer_states': [{'state': {0: {'step': torch.tensor(10.0), 'exp_avg': randn('lt.m', 4)}},
                              'param_groups': [{'lr': 1e-5, 'betas': (0.9, 0.999), 'params': [0]}]}],
        'lr_schedulers': [],
        'hparams_namespace': hp,
        'hyper_parameters': ad,
        'np_array': np.arange(3, dtype=np.float32),
        'dtype': torch.float16,
        'device': torch.device('cpu'),
    }
    f['float8.pt'] = {'w8': randn('f8', 2, 3).to(torch.float8_e4m3fn), 'w': randn('f8b', 2)}
    tied = randn('tied', 2, 2)
    f['tied.pt'] = {'embed.weight': tied, 'lm_head.weight': tied}
    f['bare_tensor.pt'] = randn('bare', 3)
    f['no_crc.pt'] = ({'w': randn('nocrc', 2, 2)}, {'crc32': False})
    sub = randn('sub', 3)
    sub.note = 'a Python attribute'  # pickled through torch._tensor._rebuild_from_type_v2
    f['tensor_with_attribute.pt'] = {'t': sub}
    torch.manual_seed(0)
    lin2 = torch.nn.Linear(2, 2)
    f['whole_module.pt'] = {'model': lin2, 'weight': lin2.weight}  # a pickled nn.Module is opaque
    return f


def write_good(d):
    os.makedirs(d)
    expected = {}
    for name, obj in good_fixtures(d).items():
        kw = {}
        if isinstance(obj, tuple):
            obj, kw = obj
        path = os.path.join(d, name)
        crc = kw.pop('crc32', True)
        torch.serialization.set_crc32_options(crc)  # False: every CRC field is written as 0
        try:
            data = torch_save_bytes(obj, **kw)
        finally:
            torch.serialization.set_crc32_options(True)
        with open(path, 'wb') as fh:
            fh.write(data)
        back = torch.load(path, weights_only=False)
        expected[name] = {'structure': structure(back), 'tensors': flat_tensors(back)}
        if name == 'dtypes.pt':
            dtypes_obj = back

    # Repacked variants of dtypes.pt: ZIP64 records with another archive name, misaligned entries
    # (copied instead of aliased), and a big-endian archive (storages byte-swapped).
    src = read_entries(os.path.join(d, 'dtypes.pt'))
    renamed = [(n.replace('archive/', 'sd-v1-4/', 1), b) for n, b in src]
    write_zip(os.path.join(d, 'zip64_renamed.pt'), renamed, zip64=True)
    write_zip(os.path.join(d, 'unaligned.pt'), src, align=0)
    swapped = []
    elem = {}
    pk = dict(src)['archive/data.pkl']
    # Element size per storage key, from the pickle's persistent ids (all float/int storages here).
    for key, cls in [(k, c) for k, c in storage_classes(pk)]:
        elem[key] = {'FloatStorage': 4, 'HalfStorage': 2, 'BFloat16Storage': 2, 'DoubleStorage': 8,
                     'LongStorage': 8, 'IntStorage': 4, 'ShortStorage': 2, 'CharStorage': 1, 'ByteStorage': 1,
                     'BoolStorage': 1}[cls]
    for n, b in src:
        if n == 'archive/byteorder':
            b = b'big'
        elif n.startswith('archive/data/'):
            e = elem[n.rsplit('/', 1)[1]]
            b = b''.join(b[i:i + e][::-1] for i in range(0, len(b), e))
        swapped.append((n, b))
    write_zip(os.path.join(d, 'bigendian.pt'), swapped)
    for name in ('zip64_renamed.pt', 'unaligned.pt', 'bigendian.pt'):
        if name != 'bigendian.pt':  # torch.load would reject nothing here; check it reads them the same
            back = torch.load(os.path.join(d, name), weights_only=False)
            assert flat_tensors(back) == flat_tensors(dtypes_obj), name
        expected[name] = expected['dtypes.pt']
    return expected


def storage_classes(pkl):
    """(key, storage class) of each persistent id of a torch pickle, read with pickletools (no
    unpickling): the strings and globals in opcode order, memo references resolved."""
    import pickletools
    tokens, memo, last = [], {}, None
    for op, arg, _ in pickletools.genops(pkl):
        if op.name == 'GLOBAL':
            last = ('g', arg.split(' ')[1])
        elif op.name in ('BINUNICODE', 'SHORT_BINUNICODE'):
            last = ('s', arg)
        elif op.name in ('BINGET', 'LONG_BINGET'):
            last = memo.get(arg)
        elif op.name in ('BINPUT', 'LONG_BINPUT'):
            memo[arg] = last
            continue
        else:
            last = None
        if last:
            tokens.append(last)
    out = set()
    for i in range(len(tokens) - 2):
        if tokens[i] == ('s', 'storage') and tokens[i + 1][0] == 'g' and tokens[i + 2][0] == 's':
            out.add((tokens[i + 2][1], tokens[i + 1][1]))
    return sorted(out)


def write_unsafe(d):
    os.makedirs(d)
    expected = {}

    def save(name, obj, global_name, **kw):
        with open(os.path.join(d, name), 'wb') as fh:
            fh.write(torch_save_bytes(obj, **kw))
        expected[name] = global_name

    # The classic __reduce__ exploit: os.system pickles as posix.system on Linux.
    save('os_system_reduce.pt', Exploit(os.system, (SHELL,)), 'posix.system')
    save('eval.pt', Exploit(eval, (f"__import__('os').system({SHELL!r})",)), 'builtins.eval')
    save('exec.pt', Exploit(exec, (f"import os; os.system({SHELL!r})",)), 'builtins.exec')
    save('import.pt', {'state_dict': {'w': torch.ones(2)}, 'x': Exploit(__import__, ('os',))}, 'builtins.__import__')
    save('subprocess_popen_stack_global.pt', Exploit(subprocess.Popen, (['sh', '-c', SHELL],)), 'subprocess.Popen',
         pickle_protocol=4)
    # Hand-made: GLOBAL os.system / nt.system spelled out, a getattr chain, a dunder escape.
    reduce_shell = b'(' + op_str(SHELL) + b'tR'
    archive_with_pickle(os.path.join(d, 'os_system_global.pt'), b'\x80\x02' + op_global('os', 'system') + reduce_shell + b'.')
    expected['os_system_global.pt'] = 'os.system'
    archive_with_pickle(os.path.join(d, 'nt_system.pt'), b'\x80\x02' + op_global('nt', 'system') + reduce_shell + b'.')
    expected['nt_system.pt'] = 'nt.system'
    getattr_chain = (b'\x80\x02' + op_global('builtins', 'getattr') + b'(' + op_global('builtins', '__import__') +
                     b'(' + op_str('os') + b'tR' + op_str('system') + b'tR' + reduce_shell + b'.')
    archive_with_pickle(os.path.join(d, 'getattr_chain.pt'), getattr_chain)
    expected['getattr_chain.pt'] = 'builtins.getattr'
    dunder = b'\x80\x04' + op_short('torch') + op_short('nn.Module.__init__.__globals__') + b'\x93' + op_str('os') + b'\x85R.'
    archive_with_pickle(os.path.join(d, 'dunder_globals.pt'), dunder)
    expected['dunder_globals.pt'] = 'torch.nn.Module.__init__.__globals__'
    # Protocol 4 resolves dotted names attribute by attribute: torch.os.system is os.system.
    via_attr = b'\x80\x04' + op_short('torch') + op_short('os.system') + b'\x93' + reduce_shell + b'.'
    archive_with_pickle(os.path.join(d, 'os_system_via_torch_attr.pt'), via_attr)
    expected['os_system_via_torch_attr.pt'] = 'torch.os.system'
    # Refused even deep inside an otherwise valid state dict, after real tensors were read.
    nested = {'state_dict': {'a': torch.ones(2), 'b': {'c': Exploit(os.system, (SHELL,))}}}
    save('nested_in_state_dict.pt', nested, 'posix.system')
    save('runpy.pt', Exploit(__import__('runpy').run_path, ('/nonexistent.py',)), 'runpy.run_path')
    return expected


def write_corrupt(d, good):
    os.makedirs(d)
    expected = {}
    valid = open(os.path.join(good, 'delta.bin'), 'rb').read()

    def raw(name, data, why):
        with open(os.path.join(d, name), 'wb') as fh:
            fh.write(data)
        expected[name] = why

    def pkl(name, data, why, storages=()):
        archive_with_pickle(os.path.join(d, name), data, storages)
        expected[name] = why

    raw('truncated.pt', valid[:len(valid) * 6 // 10], 'end-of-central-directory')
    # torch writes a ZIP64 end-of-central-directory record even for small files: patch both.
    bad = bytearray(valid)
    struct.pack_into('<I', bad, valid.rindex(b'PK\x05\x06') + 16, len(valid) + 1000)
    struct.pack_into('<Q', bad, valid.rindex(b'PK\x06\x06') + 48, len(valid) + 1000)
    raw('cd_offset_outside.pt', bytes(bad), 'central directory')
    entries = read_entries(os.path.join(good, 'delta.bin'))
    with zipfile.ZipFile(os.path.join(d, 'deflated.pt'), 'w') as z:
        for n, b in entries:
            z.writestr(n, b, compress_type=zipfile.ZIP_DEFLATED if n.endswith('data.pkl') else zipfile.ZIP_STORED)
    expected['deflated.pt'] = 'compression method 8'
    bad = bytearray(valid)
    at = valid.index(b'modifier_token')
    bad[at] ^= 0x20
    raw('bad_crc.pt', bytes(bad), 'CRC-32')
    raw('legacy_format.pt', torch_save_bytes({'w': torch.ones(2)}, _use_new_zipfile_serialization=False), 'legacy')
    raw('not_torch.bin', b'this is not a checkpoint at all\n' * 4, 'not a torch.save file')
    write_zip(os.path.join(d, 'no_data_pkl.pt'), [('archive/version', b'3\n')])
    expected['no_data_pkl.pt'] = 'data.pkl'

    four = struct.pack('<4f', 1, 2, 3, 4)
    rebuild = op_global('torch._utils', '_rebuild_tensor_v2')
    hooks = op_global('collections', 'OrderedDict') + b')R'

    def tensor_pickle(size, stride, offset=0, key='0', numel=4):
        sz = b'(' + b''.join(op_int(s) for s in size) + b't'
        st = b'(' + b''.join(op_int(s) for s in stride) + b't'
        return (b'\x80\x02}(' + op_str('w') + rebuild + b'(' + storage_pid(key, numel=numel) + op_int(offset) + sz + st +
                b'\x89' + hooks + b'tRu.')

    pkl('valid_handmade.pt', tensor_pickle([2, 2], [2, 1]), None, [('0', four)])  # sanity: loads
    pkl('unknown_opcode.pt', b'\x80\x02}\xff.', 'unknown opcode 0xff')
    pkl('unbalanced_mark.pt', b'\x80\x02((}.', 'unbalanced MARK')
    pkl('stack_underflow.pt', b'\x80\x02}s.', 'empty stack')
    pkl('no_stop.pt', b'\x80\x02}', 'without a STOP')
    pkl('missing_storage.pt', tensor_pickle([4], [1], key='7'), 'no entry archive/data/7', [('0', four)])
    pkl('storage_too_small.pt', tensor_pickle([3, 2], [2, 1]), 'beyond its storage', [('0', four)])
    pkl('offset_out_of_bounds.pt', tensor_pickle([2], [1], offset=3), 'beyond its storage', [('0', four)])
    pkl('huge_stride.pt', tensor_pickle([2, 2], [2 ** 31 - 1, 2 ** 31 - 1]), 'beyond its storage', [('0', four)])
    pkl('entry_smaller_than_numel.pt', tensor_pickle([4], [1], numel=400), 'needs 1600 bytes', [('0', four)])
    pkl('list_bomb.pt', b'\x80\x02' + b']' * 2000 + b'a' * 1999 + b'.', 'nested more than')
    pkl('mark_bomb.pt', b'\x80\x02' + b'(' * 2000 + b'.', 'MARKs are open')
    pkl('memo_out_of_range.pt', b'\x80\x02h\x05.', 'memo index 5')
    pkl('cyclic.pt', b'\x80\x02]q\x00h\x00a.', 'cyclic')
    laughs = b'\x80\x02]q\x00Na0'  # l0 = [None] in memo 0, popped
    for i in range(1, 48):  # l_i = [l_{i-1}, l_{i-1}]: 2**48 nodes once expanded
        laughs += b'](' + b'h' + bytes([i - 1]) + b'h' + bytes([i - 1]) + b'eq' + bytes([i]) + (b'0' if i < 47 else b'')
    laughs += b'.'
    pkl('memo_laughs.pt', laughs, 'expands to more than')
    # One 10,000-item list copied by set() 1,700 times: 17M container slots from 12 KB of opcodes.
    slots = (b'\x80\x02' + op_global('builtins', 'set') + b'q\x00](' + b'N' * 10000 + b'eq\x01' +
             b'h\x00h\x01\x85R0' * 1700 + b'N.')
    pkl('slots_bomb.pt', slots, 'elements in all')
    pkl('huge_string.pt', b'\x80\x02\x8d' + struct.pack('<Q', 2 ** 60) + b'x.', 'exceeds the limit')
    pkl('string_past_end.pt', b'\x80\x02X' + struct.pack('<I', 1000) + b'abc', 'ends inside')
    pkl('bad_persistent_id.pt', b'\x80\x02' + op_str('nope') + b'Q.', 'persistent id')
    pkl('reduce_non_callable.pt', b'\x80\x02})R.', 'not callable')
    pkl('setitem_on_list.pt', b'\x80\x02]' + op_str('k') + op_str('v') + b's.', 'not a dict')
    pkl('unsupported_tensor.pt', b'\x80\x02' + op_global('torch._utils', '_rebuild_sparse_tensor') + b')R.',
        'not supported')
    pkl('bad_global_name.pt', b'\x80\x02c' + b'a b\nc\n.', 'dotted Python name')
    pkl('protocol_6.pt', b'\x80\x06}.', 'protocol 6')
    # Real torch.save output of tensor kinds the loader does not support.
    raw('sparse.pt', torch_save_bytes({'w': torch.eye(3).to_sparse()}), '_rebuild_sparse_tensor')
    raw('uint16.pt', torch_save_bytes({'w': torch.ones(3, dtype=torch.uint16)}), 'torch.uint16')
    raw('complex.pt', torch_save_bytes({'w': torch.ones(3, dtype=torch.complex64)}), 'ComplexFloatStorage')
    return expected


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    good = os.path.join(ROOT, 'good')
    expected = {
        'generator': 'test/parity/make_pickle_fixtures.py',
        'torch': torch.__version__,
        'marker': MARKER,
        'good': write_good(good),
        'unsafe': write_unsafe(os.path.join(ROOT, 'unsafe')),
        'corrupt': write_corrupt(os.path.join(ROOT, 'corrupt'), good),
    }
    with open(os.path.join(ROOT, 'expected.json'), 'w') as fh:
        json.dump(expected, fh, indent=1, ensure_ascii=False)
        fh.write('\n')
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(ROOT) for f in fs)
    print(f'wrote {ROOT} ({total} bytes)')


if __name__ == '__main__':
    main()
