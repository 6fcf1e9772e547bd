r"""Times the full training and inference programs of a config: compile, step, memory, FLOPs.

  python -m hded_jax.benchmark --config=configs/nyu.py [--batch_size=4] [--dtype=float32|bfloat16]
      [--output=results.json] [--torch] [--rendering] [--op_counts] [--cache_dir=DIR]
      [--profile_dir=DIR] [--compile_profile_dir=DIR]
      [--compile_for=v5e:2x2|h100|h200|GPU.pbtxt]

What each figure means: hded_jax/benchmark_lib.py, hded_jax/benchmarking/ and docs/performance.md.
"""


from absl import app
from absl import flags
from ml_collections import config_flags

from hded_jax import benchmark_lib
from hded_jax import command_line
from hded_jax import pytorch
from hded_jax import runtime
from hded_jax.benchmarking import table
from hded_jax.benchmarking import torch_reference

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=False)
flags.DEFINE_integer('batch_size', None, 'Global batch size; default: the config\'s.')
flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute dtype; default: the config\'s.')
flags.DEFINE_integer('steps', 5, 'Timed steps per measurement (the median is reported).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps before the timed ones.')
flags.DEFINE_integer('pipeline_batches', 20, 'Batches timed from the input pipeline.')
flags.DEFINE_bool('pipeline_only', False, 'Time only the input pipeline (the config\'s '
                  'dataset.num_threads and dataset.num_workers): nothing is compiled.')
flags.DEFINE_bool('torch', False, 'Also time the PyTorch reference on the same device (needs the '
                  'torch extra; on a GPU, JAX then takes memory as it needs it, beside PyTorch).')
flags.DEFINE_list('torch_modes', None, 'PyTorch modes to time (default: all the device has: '
                  f'{torch_reference.TORCH_MODES}).')
flags.DEFINE_bool('rendering', False, 'Also time rendering the inputs from the AiF image and '
                  'the depth, as config.dataset.camera does (focus drawn from '
                  f'{benchmark_lib.RENDERING_FOCUS_RANGE} m if the config sets no camera), and '
                  'report what it adds to the train step.')
flags.DEFINE_bool('op_counts', False, 'Also lower the train and eval programs for GPU and TPU '
                  '(on any machine, with jax.export) and record their op counts.')
flags.DEFINE_bool('largest_batch', False, 'Also find the largest batch that fits in device '
                  'memory, with and without remat.')
flags.DEFINE_string('compile_for', None, 'Compile the train and eval programs on this machine '
                    "for a TPU slice ('v5e:2x2', 'v4:2x2x1', ...; needs libtpu: the tpu or "
                    "test extra) or GPUs ('h100', 'h200', or XLA's GpuTargetConfigProto of "
                    "another card in a .pbtxt file; 'h100:8' for eight on one host, "
                    "'h100:2x8' for two hosts of eight; needs JAX's CUDA plugin: the test "
                    'extra) that it lacks, instead of timing them here: compile time (GPU '
                    'autotuning off), FLOPs, memory per device, what a GPU would autotune, '
                    'the collectives between devices; with '
                    '--largest_batch the largest batches that compile within a device\'s '
                    'memory. Nothing runs.')
flags.DEFINE_string('profile_dir', None, 'Also trace a few train steps with the JAX profiler '
                    'into this folder (TensorBoard\'s profile tab or Perfetto read it), write the '
                    'compiled train program\'s HLO beside it, and report the time per device op.')
flags.DEFINE_string('compile_profile_dir', None, 'Also trace the train step\'s XLA compile '
                    'with the JAX profiler into this folder, and report the time per compiler '
                    'pass and phase.')
flags.DEFINE_float('max_busy_cores', 0.5, 'Wait while other processes keep more cores busy.')
flags.DEFINE_float('max_wait', 180.0, 'Longest wait (s) for a quiet machine per measurement.')
flags.DEFINE_string('output', None, 'Where to write the results as JSON.')
flags.DEFINE_string('cache_dir', None, 'Keep compiled programs (and GPU autotune results) here, '
                    'as train.py does in its workdir; a second run with the same directory '
                    'times a restart. Default: no cache, every compile is cold.')
flags.mark_flags_as_required(['config'])
command_line.validate_output_flag('output')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.compile_for and (FLAGS.torch or FLAGS.pipeline_only or FLAGS.profile_dir
                            or FLAGS.compile_profile_dir or FLAGS.rendering):
    raise app.UsageError('--compile_for compiles for devices that are not here and runs '
                         'nothing: leave out --torch, --pipeline_only, --profile_dir, '
                         '--compile_profile_dir and --rendering, or --compile_for.')
  if FLAGS.torch:
    try:  # Before minutes of JAX measurements, not after them.
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as error:
      raise app.UsageError(f'--torch times the PyTorch reference, which needs PyTorch ({error}): '
                           "pip install -e '.[torch]', or leave out --torch.") from error
    pytorch.load_triton_first()  # Building a dataset for the pipeline's figure imports TensorFlow.
  # As train.py does (runtime.setup); PyTorch shares the allocator. Its eval figures are thus
  # those of the convolutions chosen for training (eval.py and predict.py keep XLA's on a CPU).
  runtime.tune_for_platform(training=True, share_gpu=FLAGS.torch)
  if FLAGS.cache_dir:
    runtime.enable_compilation_cache(runtime.local_path(FLAGS.cache_dir))
  config = FLAGS.config
  if FLAGS.batch_size is not None:
    config.batch_size = FLAGS.batch_size
  if FLAGS.dtype is not None:
    config.model.dtype = FLAGS.dtype
  results = benchmark_lib.run_benchmark(
      config, steps=FLAGS.steps, warmup=FLAGS.warmup, pipeline_batches=FLAGS.pipeline_batches,
      with_torch=FLAGS.torch, torch_modes=FLAGS.torch_modes, find_largest_batch=FLAGS.largest_batch,
      rendering=FLAGS.rendering, op_counts=FLAGS.op_counts,
      profile_dir=FLAGS.profile_dir and runtime.local_path(FLAGS.profile_dir),
      compile_profile_dir=(FLAGS.compile_profile_dir
                           and runtime.local_path(FLAGS.compile_profile_dir)),
      max_busy_cores=FLAGS.max_busy_cores, max_wait=FLAGS.max_wait,
      pipeline_only=FLAGS.pipeline_only, compile_for=FLAGS.compile_for, output=FLAGS.output)
  print(table.format_table(results))


if __name__ == '__main__':
  app.run(main, flags_parser=command_line.parse_flags)
