"""The PyTorch reference (`hded_jax.pytorch.reference`) timed as the benchmark times the JAX
programs, on the same batch and device kind, so every ratio comes from one process on one
device."""

from collections.abc import Sequence

import ml_collections

from hded_jax import pytorch
from hded_jax import runtime
from hded_jax.benchmarking import batches
from hded_jax.benchmarking import measure


# PyTorch precision modes timed per device: float32 is the authors' setting; on CUDA also TF32
# matmuls/convolutions and bf16 autocast, PyTorch's fast modes.
TORCH_MODES = {'cpu': ('float32',), 'cuda': ('float32', 'tf32', 'bfloat16')}


def benchmark_torch(config: ml_collections.ConfigDict, *, steps: int, warmup: int,
                    max_busy_cores: float, max_wait: float,
                    modes: Sequence[str] | None = None) -> dict:
  """The PyTorch reference on the same batch and device kind: an Adam step on the config's loss,
  and the eval forward, in each of ``modes`` (default: ``TORCH_MODES`` of the device)."""
  pytorch.load_triton_first()
  import torch  # pylint: disable=g-import-not-at-top
  from hded_jax.pytorch import reference  # pylint: disable=g-import-not-at-top

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if device == 'cpu':
    torch.set_num_threads(runtime.usable_cores())
  else:
    torch.backends.cudnn.benchmark = True
  layout = torch.channels_last if device == 'cuda' else torch.contiguous_format
  arch = config.model
  model = reference.HDEDNet(
      tuple(arch.block_sizes), arch.growth_rate, arch.num_init_features, arch.bn_size,
      heads=tuple(arch.heads)).to(device, memory_format=layout)
  opt = config.optimizer
  optimizer = torch.optim.Adam(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2))
  batch = {k: torch.from_numpy(v).to(device)
           for k, v in batches.random_batch(config).items()}
  image = batch['image'].permute(0, 3, 1, 2).contiguous(memory_format=layout)
  targets = {'depth': batch['depth'],
             'aif': batch['aif'].permute(0, 3, 1, 2).contiguous(memory_format=layout)}
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  n = config.batch_size
  results = {'version': torch.__version__, 'device': device,
             'num_threads': torch.get_num_threads()}
  if unknown := sorted(set(modes or ()) - set(TORCH_MODES[device])):
    raise ValueError(f'PyTorch modes {unknown} are not timed on {device}; choose from '
                     f'{TORCH_MODES[device]}.')
  for mode in modes or TORCH_MODES[device]:
    if device == 'cuda':
      torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == 'tf32'
      torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(device, torch.bfloat16, enabled=mode == 'bfloat16')

    def dispatch_train():
      model.train()
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = reference.loss(model(image), targets, config.loss)
      loss.backward()
      optimizer.step()

    def run_train():
      dispatch_train()
      sync()

    def run_eval():
      model.eval()
      with torch.inference_mode(), autocast:
        model(image)
      sync()

    train_load = measure.wait_for_quiet(max_busy_cores, max_wait)
    train_times = measure.time_steps(run_train, steps=steps, warmup=warmup)
    train_times.update(measure.time_pipelined(dispatch_train, lambda _: sync(), steps=steps,
                                      batch_size=n))
    eval_load = measure.wait_for_quiet(max_busy_cores, max_wait)
    eval_times = measure.time_steps(run_eval, steps=steps, warmup=warmup)
    results[mode] = {
        'train': {**train_times, 'images_per_s': n / train_times['median_s'],
                  'load': train_load},
        'eval': {**eval_times, 'images_per_s': n / eval_times['median_s'], 'load': eval_load},
        'peak_memory_bytes': torch.cuda.max_memory_allocated() if device == 'cuda' else None}
  return results
