"""The benchmark's results as a text table of the headline figures (the JSON holds them all)."""

from collections.abc import Mapping

from hded_jax.benchmarking import largest_batch


def format_table(results: Mapping) -> str:
  """A text table of the headline figures."""
  cfg = results['config']
  if 'compiled_for' in results:
    return '\n'.join(_compiled_for_rows(results) + _lowered_and_largest_rows(results))
  pipe = results['pipeline']
  first = (f', {pipe["first_epoch_examples_per_s"]:.1f} in the first'
           if pipe.get('first_epoch_examples_per_s') else '')
  pipeline = (f'input pipeline {pipe["examples_per_s"]:.1f} examples/s after the first epoch'
              f'{first} ({pipe["source"]}; {pipe["num_threads"]} threads, '
              f'{pipe["num_workers"]} worker processes)')
  if 'jax' not in results:  # pipeline_only
    return pipeline
  rows = [f'{cfg["image_size"][0]}x{cfg["image_size"][1]}, batch {cfg["batch_size"]}, '
          f'{results["jax"]["backend"]} ({results["jax"]["device"]}, '
          f'{results["machine"]["cpu_count"]} CPUs); convolutions and matrix products in '
          f'{results["jax"]["products_in"]}',
          f'{"":18}{"compile s":>10}{"step s":>9}{"images/s":>10}{"GFLOP":>9}{"GFLOP/s":>9}'
          f'{"other busy cores":>18}']
  def row(name, r):
    compile_s = f'{r["compile_s"]:10.1f}' if 'compile_s' in r else f'{"-":>10}'
    gflop = f'{r["flops"] / 1e9:9.1f}' if r.get('flops') else f'{"-":>9}'
    rate = f'{r["flops_per_s"] / 1e9:9.1f}' if r.get('flops_per_s') else f'{"-":>9}'
    return (f'{name:18}{compile_s}{r["median_s"]:9.3f}{r["images_per_s"]:10.2f}{gflop}{rate}'
            f'{r["load"]["other_busy_cores"]:18.2f}')
  jx = results['jax']
  rows += [row(f'jax {cfg["dtype"]} train', jx['train']),
           row(f'jax {cfg["dtype"]} eval', jx['eval'])]
  pipelined = [f'jax {jx["train"]["pipelined_images_per_s"]:.2f}']
  for mode, r in results.get('torch', {}).items():
    if isinstance(r, dict):
      rows += [row(f'torch {mode} train', r['train']), row(f'torch {mode} eval', r['eval'])]
      pipelined.append(f'torch {mode} {r["train"]["pipelined_images_per_s"]:.2f}')
  rows.append('train images/s with steps dispatched back to back: ' + ', '.join(pipelined))
  rows.append(f'peak memory {jx["peak_memory_bytes"] / 2**20:.0f} MiB '
              f'({jx["peak_memory_bytes_per_image"] / 2**20:.0f} MiB/image; '
              f'{jx["peak_memory_source"]}); XLA train buffers '
              f'{(jx["train"]["xla_buffer_bytes"] or 0) / 2**20:.0f} MiB')
  rows += _kernel_launch_rows(jx)
  if render := jx.get('rendering'):
    rows.append(f'rendering the inputs ({render["mode"]}, sigma_tolerance '
                f'{render["sigma_tolerance"]}): {render["median_s"]:.3f} s per batch, adds '
                f'{100 * render["overhead"]:.1f}% to the train step without it; compiled in '
                f'{render["compile_s"]:.1f} s')
  rows.append(pipeline)
  return '\n'.join(rows + _lowered_and_largest_rows(results))


def _compiled_for_rows(results: Mapping) -> list[str]:
  cfg, target = results['config'], results['compiled_for']
  gpu = target['platform'] == 'gpu'
  memory = (f'{target["memory_bytes"] / 1e9:.0f} GB each' if target['memory_bytes']
            else 'memory unknown')
  if gpu and target['memory_bytes']:
    memory = f'{memory}: JAX\'s share of the card'
  rows = [f'{cfg["image_size"][0]}x{cfg["image_size"][1]}, batch {cfg["batch_size"]}, '
          f'{cfg["dtype"]}, compiled for {target["target"]} ({target["num_devices"]} x '
          f'{target["device"]}, {memory}) on this machine ({results["machine"]["cpu_count"]} '
          f'CPUs){", GPU autotuning off" if gpu else ""}; nothing ran',
          f'{"":18}{"lower s":>9}{"compile s":>11}{"GFLOP":>9}{"MiB per device":>16}'
          f'{"share of memory":>17}']
  for name in ('train', 'eval'):
    r = target[name]
    gflop = f'{r["flops"] / 1e9:9.1f}' if r.get('flops') else f'{"-":>9}'
    share = f'{100 * r["share_of_memory"]:16.1f}%' if r['share_of_memory'] else f'{"-":>17}'
    rows.append(f'{name:18}{r["lower_s"]:9.1f}{r["compile_s"]:11.1f}{gflop}'
                f'{(r["xla_buffer_bytes_per_device"] or 0) / 2**20:16.0f}{share}')
  for name in ('train', 'eval'):
    if tuned := target[name].get('autotuned'):
      rows.append(f'{name} autotuned on a GPU: {tuned["cudnn_convolutions"]} cuDNN convolutions '
                  f'({tuned["distinct_cudnn_convolutions"]} distinct), {tuned["cublas_gemms"]} '
                  f'cuBLAS GEMMs ({tuned["distinct_cublas_gemms"]} distinct), '
                  f'{tuned["triton_fusions"]} Triton fusions')
  rows += _kernel_launch_rows(target)
  for name in ('train', 'eval'):
    if graphs := target[name].get('command_buffers'):
      buffers = graphs['command_buffers']
      rows.append(f'{name} submitted per run: {graphs["submissions"]} ({buffers} command '
                  f'buffer{"s" * (buffers != 1)} holding {graphs["in_command_buffers"]}; outside: '
                  + (', '.join(f'{count} {kind}' for kind, count in graphs['outside'].items())
                     or 'nothing') + ')')
  for name in ('train', 'eval'):
    if (collectives := target[name].get('collectives')) is not None:
      rows.append(f'{name} collectives between the devices: ' + (', '.join(
          f'{count} {kind}' for kind, count in collectives.items()) or 'none'))
  return rows


def _kernel_launch_rows(programs: Mapping) -> list[str]:
  """The kernel launches of ``programs``' train and eval, where counted (GPUs)."""
  return [f'{name} kernels launched per run: {launches["total"]} ({launches["fusions"]} '
          f'fusions, {launches["custom_calls"]} custom calls, {launches["copies"]} copies, '
          f'{launches["other"]} other)'
          for name in ('train', 'eval') if (launches := programs[name].get('kernel_launches'))]


def _lowered_and_largest_rows(results: Mapping) -> list[str]:
  rows = []
  for program, by_platform in results.get('lowered', {}).items():
    rows.append(f'{program} lowered: ' + '; '.join(
        f'{platform} {c["ops"]} ops, {c["convolutions"]} convolutions '
        f'({c["distinct_convolutions"]} distinct), {sum(c["custom_calls"].values())} custom calls'
        for platform, c in by_platform.items()))
  for name, r in results.get('largest_batch', {}).items():
    if r['batch_size'] is None:
      rows.append(f'largest batch ({name}): None ({r["why"]})')
      continue
    if r['smallest_refused']:
      bound = f'{r["smallest_refused"]} did not fit'
    elif r['search_ended']:
      bound = f'its buffers put the limit within {largest_batch.LARGEST_BATCH_TOLERANCE:.0%}'
    else:
      bound = 'a lower bound: the tries ran out'
    rows.append(f'largest batch ({name}): {r["batch_size"]} ({r["checked"]}; {bound})')
  return rows
