"""Tests of the build edge (lra.build): config checks and the read-only restore of a workdir."""
import os
import shutil

import pytest
from conftest import smoke_config

from lra import build


def test_build_checks_the_loop_settings_before_anything_else():
  config = smoke_config('listops', '', num_eval_steps=0)
  with pytest.raises(ValueError, match=r'config.num_eval_steps=0; expected -1 \(whole split\)'):
    build.build(config)
  parts = build.build(smoke_config('listops', ''))
  assert parts.info.name == 'listops' and parts.config.task == 'listops'


def _tree(root: str) -> set[str]:
  return {os.path.relpath(os.path.join(folder, name), root)
          for folder, folders, files in os.walk(root) for name in folders + files}


@pytest.mark.slow
def test_restore_reads_the_workdir_and_changes_nothing_there(listops_run, tmp_path):
  config, source, results = listops_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  restored = build.restore(workdir)  # the workdir's config.json
  assert restored.config.to_dict() == config.to_dict()
  assert (restored.checkpoint, restored.step) == ('best', results['best_step'])
  # An unrestorable latest checkpoint is passed over, not set aside as training would.
  open(os.path.join(workdir, 'checkpoints', '4', 'state', '_METADATA'), 'w').close()
  before = _tree(workdir)
  restored = build.restore(workdir, checkpoint='latest')
  assert (restored.checkpoint, restored.step) == ('latest', 2)
  assert _tree(workdir) == before


def test_restore_without_a_config_or_checkpoint_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    build.restore(str(tmp_path))
  os.makedirs(tmp_path / 'checkpoints')
  with pytest.raises(FileNotFoundError, match='has no config.json'):
    build.restore(str(tmp_path))
  assert _tree(str(tmp_path)) == {'checkpoints'}
