"""What XLA is asked to compile on GPU and TPU, seen from any machine.

``jax.export`` lowers a jitted function for a platform without its devices, so a CPU-only machine
(CI) sees the StableHLO program that a GPU or TPU would compile. Counting its ops catches
CPU-only code paths that leak into the accelerator program and growth in what the accelerator
compiler must work through: XLA's GPU backend autotunes every distinct convolution.
``autotuned_calls`` counts that work in a program compiled for a GPU (which needs no GPU either:
`compile_targets.devices_not_here`), ``kernel_launches`` what one run of it launches,
``command_buffers`` how XLA groups those launches into CUDA graphs, and ``collectives`` the
traffic between devices in one compiled for several.
"""

from collections import Counter
from collections.abc import Sequence
import re

import jax

PLATFORMS = ('cuda', 'tpu')

# An op statement starts a line: optional results (`%0 = `, `%1:2 = `), then `dialect.name`
# (generic form in quotes). Ops printed inside another op's pretty form (`applies stablehlo.add`)
# are not statements and not counted.
_OP = re.compile(r'^\s*(?:%[^=]*=\s*)?"?([a-z_]+\.[a-z_0-9.]+)', re.MULTILINE)
_CUSTOM_CALL_TARGET = re.compile(r'stablehlo\.custom_call\s+@([\w.$-]+)')
# Arrays baked into the program (e.g. host-computed weights) print as hex literals.
_HEX_CONSTANT = re.compile(r'dense<"0x([0-9A-Fa-f]*)">')
# A convolution's or matrix product's precision (its first operand's), as printed.
_PRECISION = re.compile(r'precision(?:_config)? = \[(?:#stablehlo<precision )?([A-Z]+)')
_SSA_NAME = re.compile(r'%[\w#:]+')
_LOCATION = re.compile(r'\s*loc\(.*\)\s*$')
# A compiled HLO module's text: a value's definition (`%name = type op(`), a custom call's
# target, and the metadata that names where an instruction came from.
_HLO_VALUE = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ', re.MULTILINE)
_HLO_CUSTOM_CALL = re.compile(r'^\s*(?:ROOT )?%[\w.\-]+ = (.*) custom-call\(([^)]*)\)(.*)$',
                              re.MULTILINE)
_HLO_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_HLO_METADATA = re.compile(r'metadata=\{[^}]*\}')
# The comments in a compiled HLO module's tuple types (`/*index=5*/`), removed before matching
# the next two patterns, which take a type for the text up to the opcode, with no '=' in it.
_HLO_COMMENT = re.compile(r'/\*.*?\*/')
# A collective between devices in a compiled HLO module: its asynchronous form by its start,
# whose shape is a tuple of tuples.
_HLO_COLLECTIVE = re.compile(
    r'^\s*(?:ROOT )?%[\w.\-]+ = [^=]*? (all-reduce|all-gather|reduce-scatter|'
    r'all-to-all|collective-permute|collective-broadcast)(?:-start)?\(', re.MULTILINE)
# An instruction's opcode in a compiled HLO module.
_HLO_OPCODE = re.compile(r'^\s*(?:ROOT )?%[\w.\-]+ = [^=]*? ([a-z][a-z\-]*)\(', re.MULTILINE)
# Instructions that launch nothing on the device: they name, regroup or reinterpret buffers (as
# does an asynchronous operation's `...-done`, which waits for its start).
_NOT_LAUNCHED = frozenset({'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant'})
# What XLA's GPU autotuner times, by custom-call target: cuDNN's convolutions (every
# algorithm of each) and cuBLAS's matrix products.
_AUTOTUNED = {'cudnn_convolutions': '__cudnn$conv', 'cublas_gemms': '__cublas$'}


def op_counts(jitted, *args, platforms: Sequence[str] = PLATFORMS, **kwargs) -> dict[str, dict]:
  """{platform: counts} for ``jitted`` (a ``jax.jit`` function) lowered for each platform.

  ``args`` and ``kwargs`` are example arguments or ``jax.ShapeDtypeStruct``s; nothing runs.
  Call it inside the mesh context the function needs (``jax.set_mesh``), as for ``lower``.
  """
  return {platform: count_ops(jax.export.export(jitted, platforms=(platform,))(
      *args, **kwargs).mlir_module()) for platform in platforms}


def count_ops(module_text: str) -> dict:
  """Op counts of a StableHLO module's text (as ``Exported.mlir_module()`` prints it).

  ``convolutions`` counts convolution ops; ``distinct_convolutions`` the different ones among
  them (operand and result types, window, dimension numbers: what XLA tunes and compiles
  once); ``custom_calls`` by call target; ``ops`` every op statement, all dialects;
  ``constant_bytes`` the size of the arrays written into the program as literals;
  ``precisions`` the convolutions and matrix products by precision (``DEFAULT``: the
  platform's own).
  """
  statements = [(match.group(1), line) for line in module_text.splitlines()
                if (match := _OP.match(line))]
  convolutions = [_signature(line) for name, line in statements
                  if name == 'stablehlo.convolution']
  return {
      'ops': len(statements),
      'convolutions': len(convolutions),
      'distinct_convolutions': len(set(convolutions)),
      'custom_calls': dict(sorted(Counter(_CUSTOM_CALL_TARGET.findall(module_text)).items())),
      'constant_bytes': sum(len(digits) // 2 for digits in _HEX_CONSTANT.findall(module_text)),
      'precisions': dict(sorted(Counter(
          (match.group(1) if (match := _PRECISION.search(line)) else 'DEFAULT')
          for name, line in statements
          if name in ('stablehlo.convolution', 'stablehlo.dot_general')).items())),
  }


def _signature(line: str) -> str:
  """An op's line without its value names and source location."""
  return _SSA_NAME.sub('%', _LOCATION.sub('', line)).strip()


def autotuned_calls(hlo_text: str) -> dict[str, int]:
  """The custom calls that XLA's GPU autotuner times in a program compiled for a GPU (the text
  of ``jax.stages.Compiled.as_text()``), by kind: ``cudnn_convolutions``, ``cublas_gemms``, each
  also ``distinct_...``: XLA tunes each distinct call (result and operand types, window,
  dimension labels, backend config) once, so a cold compile's autotuning grows with those.
  ``triton_fusions`` counts the fusions XLA emits with Triton, which it tunes too."""
  types = dict(_HLO_VALUE.findall(hlo_text))
  calls = Counter()
  distinct = {kind: set() for kind in _AUTOTUNED}
  for result, operands, attributes in _HLO_CUSTOM_CALL.findall(hlo_text):
    target = _HLO_TARGET.search(attributes)
    kind = next((kind for kind, prefix in _AUTOTUNED.items()
                 if target and target.group(1).startswith(prefix)), None)
    if kind is None:
      continue
    calls[kind] += 1
    operand_types = [types.get(name.strip().lstrip('%'), '?') for name in operands.split(',')]
    distinct[kind].add((result, *operand_types, _HLO_METADATA.sub('', attributes)))
  counts = {}
  for kind in _AUTOTUNED:
    counts[kind] = calls[kind]
    counts[f'distinct_{kind}'] = len(distinct[kind])
  counts['triton_fusions'] = hlo_text.count('"kind":"__triton')
  return counts


def kernel_launches(hlo_text: str) -> dict[str, int]:
  """What one run of a program compiled for a GPU (the text of ``Compiled.as_text()``) launches
  on the device, from its entry computation: ``fusions`` (XLA's own kernels), ``custom_calls``
  (cuDNN, cuBLAS), ``copies``, ``other`` (collectives, loops, ...) and ``total``. A loop's body
  is not looked into. Each launch costs the GPU a few microseconds however little it computes,
  so thousands per step show up as idle time between kernels."""
  start = hlo_text.find('\nENTRY ')
  if start < 0:
    raise ValueError('No entry computation in this HLO text: pass Compiled.as_text().')
  entry = _HLO_COMMENT.sub('', hlo_text[start:])
  end = entry.find('\n}')
  opcodes = Counter(opcode for opcode in _HLO_OPCODE.findall(entry[:end if end >= 0 else None])
                    if opcode not in _NOT_LAUNCHED and not opcode.endswith('-done'))
  counts = {'fusions': opcodes.pop('fusion', 0), 'custom_calls': opcodes.pop('custom-call', 0),
            'copies': opcodes.pop('copy', 0), 'other': sum(opcodes.values())}
  return {**counts, 'total': sum(counts.values())}


# A line of XLA's dumped thunk sequence: its indentation (nested in a command buffer when
# indented), its index and its kind (`000: kCommandBuffer  [...`, `    001: kCopy  [...`).
_THUNK = re.compile(r'^( *)\d+: +(k\w+)', re.MULTILINE)


def command_buffers(thunk_sequence: str) -> dict:
  """How one run of a program compiled for a GPU reaches the device, from XLA's thunk sequence
  after its thunk passes (the ``*.thunk_sequence_after_thunk_passes.txt`` that ``xla_dump_to``
  writes). XLA records runs of kernels, copies and library calls into command buffers, each
  launched as one CUDA graph; the kinds it records are ``--xla_gpu_enable_command_buffer``'s,
  and a run of fewer than ``--xla_gpu_graph_min_graph_size`` stays outside. ``submissions``:
  the command buffers and the thunks left outside them, what the host launches per run;
  ``in_command_buffers``: the thunks recorded; ``outside``: the thunks left outside, by kind."""
  thunks = _THUNK.findall(thunk_sequence)
  top = [kind for indent, kind in thunks if not indent]
  if not top:
    raise ValueError('No thunks in this text: pass the thunk sequence XLA dumps for a GPU.')
  outside = Counter(kind for kind in top if kind != 'kCommandBuffer')
  return {'submissions': len(top), 'command_buffers': top.count('kCommandBuffer'),
          'in_command_buffers': len(thunks) - len(top), 'outside': dict(sorted(outside.items()))}


def collectives(hlo_text: str) -> dict[str, int]:
  """The collectives between devices in a compiled program (the text of
  ``jax.stages.Compiled.as_text()``), by kind ('all-reduce', 'all-gather', ...), each as
  written in the program: one in a loop's body counts once. In this model's data-parallel train
  step, the all-reduces of BatchNorm's batch statistics and of the gradients (which XLA
  combines)."""
  return dict(sorted(Counter(_HLO_COLLECTIVE.findall(_HLO_COMMENT.sub('', hlo_text))).items()))
