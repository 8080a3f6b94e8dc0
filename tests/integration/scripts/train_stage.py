"""Run one training stage on the smoke data (used by the resume tests under python or torchrun, as the module
``tests.integration.scripts.train_stage``); the last argument is a JSON overlay of the smoke preset's stage config (``{"schedule": {"max_steps": 6}}``)."""

import json
import logging
import sys

from m2d2.presets import stage_config
from m2d2.train.stages import STAGE_RUNNERS

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    stage, features, inputs, out_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    cfg = stage_config(stage, "smoke").replace(**json.loads(overrides))
    run = STAGE_RUNNERS[stage]
    result = run(cfg, features, inputs, out_dir)
    print("RESULT " + json.dumps({"steps": result.steps, "export": result.export_dir}))
