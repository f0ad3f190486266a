"""The fuzz suite's seed: PULLGATE_FUZZ_SEED if set, else random; printed in the report
header so any failure can be reproduced with the same seed."""

from __future__ import annotations

import os
import random

SEED = int(os.environ.get("PULLGATE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
