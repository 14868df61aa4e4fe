"""A cached `extract` rerun loads only what extract needs: each stage is imported by its command."""

import subprocess
import sys

from config_factory import ROOT


def test_importing_the_driver_leaves_score_train_and_predict_unloaded():
    code = (
        "import sys, pipeline.orchestrate\n"
        "heavy = ['scipy.stats', 'sklearn', 'stages.score.runner', 'stages.train.runner', 'stages.predict']\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
