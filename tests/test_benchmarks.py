"""Tests of benchmarks.attention, .fused, .model_step, .compile_memory, .ptxas and
benchmarks/gpu.sh on CPU, tiny shapes.

The GPU-only forms (cuDNN flash) must appear as skip rows here; the benchmarks must import
neither TensorFlow nor (benchmarks.attention) ml-collections, which GPU images often lack.
"""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

import config_cli
from benchmarks import attention, compile_memory, model_step, ptxas
from benchmarks import fused as fused_bench
from topk import fused as fused_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--lengths', '64,128', '--dtypes', 'float32', '--repeats', '2', '--chunk', '32',
        '--k', '8', '--max_search_length', '128']


def _run_python(code: str) -> str:
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


@pytest.mark.slow
def test_attention_on_cpu_rows_ratios_skips_and_no_tensorflow(tmp_path):
  # --time_longest adds topk's longest fitting length (128 here) to the timed lengths, as on GPU.
  argv = [*TINY, '--lengths', '64', '--time_longest', '--forms',
          'qk_product,chunked,topk,topk_fused,topk_filter,cudnn,torch', '--baseline', 'chunked',
          '--out',
          str(tmp_path)]
  stdout = _run_python(
      'import sys\n'
      'from benchmarks import attention\n'
      f'attention.main({argv!r})\n'
      "print('imported:', 'tensorflow' in sys.modules, 'ml_collections' in sys.modules)\n")
  assert 'imported: False False' in stdout
  assert f'device: {attention.machine()}' in stdout
  assert (tmp_path / 'attention.png').stat().st_size > 0
  columns, rows = _read_csv(str(tmp_path / 'attention.csv'))
  assert tuple(columns) == attention.COLUMNS
  assert [(r['form'], int(r['length'])) for r in rows] == [
      (form, length) for length in (64, 128)
      for form in ('qk_product', 'chunked', 'topk', 'topk_fused', 'topk_filter', 'cudnn',
                   'torch')]
  at = {(r['form'], int(r['length'])): r for r in rows}
  for length in (64, 128):
    for form in ('qk_product', 'chunked', 'topk'):
      r = at[(form, length)]
      assert (r['skipped'], r['dtype'], r['jax']) == ('', 'float32', attention.jax.__version__)
      passes = ('fwd',) if form == 'qk_product' else ('fwd', 'fwd_bwd')
      for name in passes:
        assert float(r[f'{name}_ms']) > 0 and float(r[f'{name}_temp_mib']) > 0
        base = float(at[('chunked', length)][f'{name}_ms'])
        assert float(r[f'{name}_ratio']) == pytest.approx(float(r[f'{name}_ms']) / base)
    assert float(at[('chunked', length)]['fwd_bwd_ratio']) == 1.0
    assert math.isnan(float(at[('qk_product', length)]['fwd_bwd_ms']))
    cudnn = at[('cudnn', length)]
    assert 'NVIDIA GPU' in cudnn['skipped'] and math.isnan(float(cudnn['fwd_ms']))
    for form in ('topk_fused', 'topk_filter'):
      assert 'NVIDIA GPUs only' in at[(form, length)]['skipped']
    try:
      import torch  # noqa: F401
    except ImportError:
      assert 'torch is not importable' in at[('torch', length)]['skipped']
    else:
      assert float(at[('torch', length)]['fwd_bwd_ms']) > 0
  assert 'longest length within 16.0 GiB (fwd+bwd float32, compiled): topk: 128' in stdout


@pytest.mark.slow
def test_attention_memory_limit_and_time_budget_skip_rows(tmp_path):
  rows = attention.main([*TINY, '--lengths', '64', '--forms', 'chunked', '--baseline', 'chunked',
                         '--memory_limit_mib', '0.1', '--out', str(tmp_path)])
  assert rows[0]['skipped'].startswith('fwd needs') and 'over the limit of' in rows[0]['skipped']
  assert math.isnan(rows[0]['fwd_ms']) and rows[0]['fwd_temp_mib'] > 0
  rows = attention.main([*TINY, '--forms', 'chunked', '--budget_s', '0', '--out', str(tmp_path)])
  assert [(r['length'], r['skipped'][:12]) for r in rows] == [(64, 'time budget:'),
                                                              (128, 'time budget:')]


def test_attention_defaults_follow_the_backend(monkeypatch):
  cpu = attention._parse([])
  assert (cpu.lengths, cpu.dtypes, cpu.baseline, cpu.chunk, cpu.time_longest) == (
      [1024, 2048, 4096, 8192], ['float32'], 'vanilla', 256, False)
  monkeypatch.setattr(attention.jax, 'default_backend', lambda: 'gpu')
  gpu = attention._parse([])
  assert (gpu.lengths, gpu.dtypes, gpu.baseline, gpu.chunk, gpu.time_longest, gpu.budget_s) == (
      [4096, 16384, 65536], ['bfloat16', 'float32'], 'cudnn', 1024, True, 220)
  assert set(gpu.forms) == {'cudnn', 'torch', 'vanilla', 'chunked', 'topk', 'topk_fused'}
  assert attention._jax_form('cudnn', 'bfloat16', gpu) is attention._cudnn
  with pytest.raises(attention.Unavailable, match='bfloat16 and float16 only'):
    attention._jax_form('cudnn', 'float32', gpu)
  assert attention._parse(['--lengths', '64', '--no-time_longest']).time_longest is False


# The fused kernels run on this CPU, in Pallas' interpreter, with tiles for tiny shapes.
INTERPRETED = ['--fused_platforms', 'cpu,cuda', '--fused_options',
               '{"compact": {"block_q": 16, "key_tile": 16}, '
               '"filter": {"block_q": 16, "key_tile": 16, "stride": 2, "groups": 16}}']


@pytest.mark.slow
@pytest.mark.parametrize('form, variant', [('topk_fused', 'compact'),
                                           ('topk_filter', 'filter'),
                                           ('topk_filter_mix', 'filter')])
def test_attention_fused_form_is_skipped_where_the_kernel_does_not_run(monkeypatch, tmp_path,
                                                                       form, variant):
  # A GPU where the kernel does not compile (on this CPU Triton fails like that): topk_attention
  # would run the unfused path, so a fused form's row must not time it; where it compiles, it
  # times.
  monkeypatch.setattr(fused_module, '_COMPILES', {})
  monkeypatch.setattr(attention.jax, 'default_backend', lambda: 'gpu')
  argv = [*TINY, '--lengths', '64', '--forms', form, '--baseline', form, '--budget_s', '1e9',
          '--no-time_longest', '--no-search_longest', '--out', str(tmp_path)]
  not_run = f'fused kernel {variant!r} does not run here'
  row, = attention.main(argv)
  assert not_run in row['skipped'] and math.isnan(row['fwd_ms'])
  monkeypatch.setattr(fused_module, 'compiles', lambda *args, **kwargs: True)
  row, = attention.main(argv)  # it compiles, but on a CPU platform the unfused path runs
  assert not_run in row['skipped']
  row, = attention.main([*argv, *INTERPRETED])
  assert row['skipped'] == '' and row['fwd_bwd_ms'] > 0


@pytest.mark.slow
def test_attention_1m_target_is_not_failed_by_a_search_stopped_short(monkeypatch, capsys,
                                                                     tmp_path):
  # A search stopped by the spent budget after its first length (128), or by
  # --max_search_length, before any length over the limit, says nothing of 1M within 80 GiB.
  # A GPU where the kernel compiles.
  monkeypatch.setattr(attention.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(fused_module, 'compiles', lambda *args, **kwargs: True)
  for flags, why in ((['--max_search_length', '1024'], 'by the time budget'),
                     (['--budget_s', '1e9', '--no-time_longest'], 'at --max_search_length')):
    attention.main([*TINY, '--lengths', '128', '--forms', 'topk_fused', '--budget_s', '0',
                    '--memory_limit_mib', '81920', *flags, *INTERPRETED, '--out', str(tmp_path)])
    assert ('compiles within 80.0 GiB: no (target: within 80 GiB: not checked: search stopped '
            f'{why})') in capsys.readouterr().out
  # A search that ended on a length over the limit fails the target.
  monkeypatch.setattr(attention, '_longest_fitting', lambda form, *args: (524288, ''))
  attention.main([*TINY, '--forms', 'topk_fused', '--budget_s', '0', '--memory_limit_mib',
                  '81920', *INTERPRETED, '--out', str(tmp_path)])
  assert 'no (target: within 80 GiB: FAIL)' in capsys.readouterr().out


@pytest.mark.parametrize('flag', [['--forms', 'flash'], ['--dtypes', 'float64'],
                                  ['--baseline', 'dense'], ['--repeats', '0'],
                                  ['--fused_options', '[16]'], ['--fused_options', '{bad'],
                                  ['--fused_options', '{"block_q": 16}'],
                                  ['--fused_options', '{"compact": {"block_q": 24}}'],
                                  ['--fused_options', '{"filter": {"block_q": 16, "x": 1}}'],
                                  ['--fused_options', '{"radix": {}}']])
def test_attention_rejects_bad_flags(flag, tmp_path):
  with pytest.raises((SystemExit, ValueError)):
    attention.main([*TINY, *flag, '--out', str(tmp_path)])


@pytest.mark.slow
def test_model_step_smoke_without_tensorflow(tmp_path):
  argv = ['--config=configs/listops.py:topk,smoke', '--repeats', '1', '--out', str(tmp_path)]
  stdout = _run_python(
      'import sys\n'
      'from benchmarks import model_step\n'
      f'model_step.main({argv!r})\n'
      "print('imported:', 'tensorflow' in sys.modules)\n")
  assert 'imported: False' in stdout
  columns, rows = _read_csv(str(tmp_path / 'model_step.csv'))
  assert tuple(columns) == model_step.COLUMNS and len(rows) == 1
  row = rows[0]
  assert (row['task'], row['kind'], row['dtype'], row['batch'], row['length']) == (
      'listops', 'topk', 'float32', '8', '64')
  assert row['fits'] == 'True' and row['skipped'] == ''
  for name in ('params', 'temp_gib', 'argument_gib', 'total_gib', 'step_ms', 'run_hours'):
    assert float(row[name]) > 0, name
  assert float(row['total_gib']) >= float(row['temp_gib'])


@pytest.mark.slow
def test_model_step_reports_memory_of_a_step_that_does_not_fit():
  config = config_cli.get_config('configs/retrieval.py:vanilla,smoke')
  config.model.num_layers = 1
  row = model_step.measure(config, repeats=1, limit=1024)
  assert (row['task'], row['fits'], row['length']) == ('retrieval', False, 64)
  assert row['total_gib'] > 1024 / 2**30 and 'over the limit' in row['skipped']
  assert math.isnan(row['step_ms'])


@pytest.mark.slow
def test_model_step_fused_column_says_whether_the_step_runs_the_kernel():
  config = config_cli.get_config('configs/listops.py:topk,smoke')
  config.model.num_layers = 1
  # On CPU the kernel is not in the step: asked for, the row is not timed as if it were.
  row = model_step.measure(config, repeats=1, limit=2**40, require_fused=True)
  assert row['fused'] is False and 'fused kernel is not in the step' in row['skipped']
  assert math.isnan(row['step_ms'])
  # Run in the interpreter, it is (and its step is timed).
  with config.unlocked():
    config.attention.fused_options = fused_module.FusedOptions(
        platforms=('cpu', 'cuda'), tuning=fused_module.Tiling(block_q=16, key_tile=16))
  row = model_step.measure(config, repeats=1, limit=2**40, require_fused=True)
  assert row['fused'] is True and row['skipped'] == '' and row['step_ms'] > 0
  # --fused_variant chooses the kernel; the column asks for that one.
  args = model_step._parse(['--all', '--fused_variant', 'filter', *INTERPRETED])
  with config.unlocked():
    config.attention.fused_options = attention.fused_options(args, args.fused_variant)
  row = model_step.measure(config, repeats=1, limit=2**40, require_fused=True)
  assert row['fused'] is True and row['skipped'] == '' and row['step_ms'] > 0


@pytest.mark.slow
def test_model_step_takes_config_overrides(tmp_path):
  overrides = ['--config.model.num_layers=1', '--config.batch_size=2', '--config.max_length=32']
  [row] = model_step.main(['--config=configs/listops.py:vanilla,smoke', *overrides,
                           '--repeats', '1', '--out', str(tmp_path)])
  assert (row['batch'], row['length'], row['skipped']) == (2, 32, '')
  assert row['config'] == ' '.join(['configs/listops.py:vanilla,smoke', *overrides])


def test_model_step_all_lists_every_task_and_kind():
  args = model_step._parse(['--all', '--tasks', 'listops,pathx', '--kinds', 'vanilla,topk',
                            '--preset', 'smoke'])
  assert args.config == ['configs/listops.py:vanilla,smoke', 'configs/listops.py:topk,smoke',
                         'configs/pathx.py:vanilla,smoke', 'configs/pathx.py:topk,smoke']
  assert len(model_step._parse(['--all']).config) == 3 * len(model_step.TASK_CONFIGS)
  assert all(os.path.isfile(os.path.join(ROOT, 'configs', f'{task}.py'))
             for task in model_step.TASK_CONFIGS)
  with pytest.raises(SystemExit):
    model_step._parse(['--all', '--tasks', 'cifar'])


# benchmarks.fused on shapes the interpreter runs in seconds: 1 head of depth 16, k 8.
FUSED_TINY = ['--length', '128', '--check_length', '64', '--heads', '1', '--head_dim', '16',
              '--k', '8', '--rows', '4', '--chunk', '32', '--repeats', '1']


@pytest.mark.slow
def test_fused_checks_selections_and_tuning_on_cpu(tmp_path):
  rows = fused_bench.main([*FUSED_TINY, '--tilings', '16:16:4:2,16:32:2:2', '--out',
                           str(tmp_path)])
  checks = [r for r in rows if r['stage'] == 'check']
  assert len(checks) == 4 and all(r['detail'].startswith('PASS') for r in checks)
  selections = [r for r in rows if r['stage'] == 'select']
  assert {r['name'] for r in selections} >= {'lax', 'two_stage', 'pallas'}
  assert all('equal to lax.top_k' in r['detail'] for r in selections)
  tilings = [r for r in rows if r['stage'] == 'tune' and 'block_q' in r['name']]
  assert len(tilings) == 2 and all(r['ms'] > 0 for r in tilings)
  with open(tmp_path / 'fused_options.json') as f:
    best = json.load(f)
  assert best in [{'compact': {'block_q': 16, 'key_tile': 16, 'num_warps': 4, 'num_stages': 2}},
                  {'compact': {'block_q': 16, 'key_tile': 32, 'num_warps': 2, 'num_stages': 2}}]
  columns, written = _read_csv(str(tmp_path / 'fused.csv'))
  assert tuple(columns) == fused_bench.COLUMNS and len(written) == len(rows)


@pytest.mark.slow
def test_gpu_script_writes_every_benchmark_to_out(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
             FUSED_ARGS=' '.join([*FUSED_TINY, '--stages', 'tune', '--tilings', '16:16:4:2']),
             FILTER_ARGS='--stages time --lengths 64 --causal false --heads 1 --head_dim 16 '
                         '--k 4 --dtypes float32 --repeats 1 --tilings 16:16:4:2 '
                         '--small groups=16',
             ATTENTION_ARGS=' '.join([*TINY, '--forms', 'chunked', '--budget_s', '0']),
             FILTER_ATTENTION_ARGS=' '.join([*TINY, '--lengths', '64', '--dtypes', 'float32']),
             COMPILE_MEMORY_ARGS='--lengths 256 --heads 1 --head_dim 16 --k 4 --chunk 64',
             MODEL_STEP_ARGS='--tasks listops --kinds topk --preset smoke --budget_s 0')
  result = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu.sh')], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  for name in ('fused.csv', 'fused.log', 'fused_options.json', 'filter.csv', 'attention.csv',
               'attention.log', 'filter_attention.log', 'filter_attention/attention.csv',
               'model_step.csv', 'model_step.log', 'model_step_filter/model_step.csv',
               'ptxas.log', 'compile_memory.csv', 'compile_memory.log'):
    assert (tmp_path / name).stat().st_size > 0, name
  assert 'no GPU here' in (tmp_path / 'ptxas.log').read_text()
  # The tuned options reach the attention benchmark.
  for log in ('attention.log', 'filter_attention.log'):
    assert "fused kernel options {'compact': {'block_q': 16, 'key_tile': 16" in (
        tmp_path / log).read_text()
  _, rows = _read_csv(str(tmp_path / 'attention.csv'))
  assert [(r['form'], r['length'], r['skipped'][:12]) for r in rows] == [
      ('chunked', '64', 'time budget:'), ('chunked', '128', 'time budget:')]
  # The filter variant's forward and forward+backward beside the compact kernel's, the unfused
  # path's and cuDNN flash's (on CPU only the unfused path runs).
  _, rows = _read_csv(str(tmp_path / 'filter_attention' / 'attention.csv'))
  assert [(r['form'], r['length']) for r in rows] == [
      (form, '64') for form in ('cudnn', 'topk', 'topk_fused', 'topk_filter', 'topk_filter_mix')]
  assert float(rows[1]['fwd_ms']) > 0 and float(rows[1]['fwd_bwd_ms']) > 0
  assert 'NVIDIA GPUs only' in rows[3]['skipped']
  _, rows = _read_csv(str(tmp_path / 'model_step.csv'))
  # Top-k is measured with and without the fused kernel, fused first.
  assert [(r['config'], r['dtype'], r['fused']) for r in rows] == [
      ('configs/listops.py:topk,smoke', 'bfloat16', 'True'),
      ('configs/listops.py:topk,smoke', 'bfloat16', 'False')]
  # The ListOps step with the filter variant (here cut by the time budget of 0 s).
  _, rows = _read_csv(str(tmp_path / 'model_step_filter' / 'model_step.csv'))
  assert [(r['config'], r['fused'], r['skipped'][:12]) for r in rows] == [
      ('configs/listops.py:topk,smoke', 'True', 'time budget:')]


def test_compile_memory_rows_say_which_path_compiled(tmp_path):
  rows = compile_memory.main(['--lengths', '512', '--heads', '2', '--head_dim', '16', '--k', '8',
                              '--chunk', '128', '--out', str(tmp_path)])
  # On CPU the fused variants compile in Pallas' interpreter (--fused_platforms cpu by default).
  assert [(r['form'], r['kernel']) for r in rows] == [
      ('topk', False), ('topk_fused', True), ('topk_filter', True), ('topk_filter_mix', True)]
  assert all(r['temp_mib'] > 0 and r['arg_mib'] > 0 and r['fits'] for r in rows)
  columns, written = _read_csv(str(tmp_path / 'compile_memory.csv'))
  assert tuple(columns) == compile_memory.COLUMNS and len(written) == 4
  # Left on CUDA only, the fused forms compile the unfused path here, and say so.
  rows = compile_memory.main(['--lengths', '512', '--heads', '2', '--head_dim', '16', '--k', '8',
                              '--forms', 'topk_filter', '--fused_platforms', 'cuda',
                              '--out', str(tmp_path)])
  assert [r['kernel'] for r in rows] == [False]


PTXAS_OUTPUT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'topk_filter_candidates' for 'sm_90a'
ptxas info    : Function properties for topk_filter_candidates
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, 24576 bytes smem, 464 bytes cmem[0]
ptxas info    : Compiling entry function 'loop_add_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion
    8 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, 380 bytes cmem[0]
"""


def test_ptxas_output_and_ptx_are_parsed():
  assert ptxas.parse_ptxas(PTXAS_OUTPUT) == [
      dict(entry='topk_filter_candidates', target='sm_90a', registers=168, spill_stores=0,
           spill_loads=0, stack_bytes=0, smem_bytes=24576),
      dict(entry='loop_add_fusion', target='sm_90a', registers=255, spill_stores=40,
           spill_loads=36, stack_bytes=8, smem_bytes=0)]
  ptx = ('//\n.version 8.4\n.target sm_90a\n.address_size 64\n\n'
         '.visible .entry topk_fused_candidates(\n\t.param .u64 p0\n)\n{\n\tret;\n}\n')
  assert ptxas.ptx_target(ptx) == 'sm_90a' and ptxas.ptx_target('.version 8.4') is None
  assert ptxas.defines(ptx, fused_module.KERNEL_NAME)
  assert not ptxas.defines(ptx, 'topk_filter_candidates')


def test_ptxas_without_a_gpu_says_so_and_the_child_compiles(tmp_path, capsys):
  assert ptxas.main(['--out', str(tmp_path)]) == []
  assert 'no GPU here' in capsys.readouterr().out
  # The child's part: both variants' programs compile (on CPU without their kernels).
  assert ptxas.main(['--length', '64', '--heads', '1', '--head_dim', '16', '--k', '4',
                     f'--compile_into={tmp_path}']) == []
