import os
import sys

# Model-loading progress bars are noise in a terminal and in job logs; our own progress is shown instead.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from workbench.cli import main  # noqa: E402 - after the environment is set

sys.exit(main())
