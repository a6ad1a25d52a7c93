# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
Re-saves the shipped shapes model (examples/shapes/model) with the repository's current code, so that its copies of
configuration_cli.py, modeling_cli.py and processing_cli.py are byte-identical to the repository's (checked by
tests/test_training.py). Run it after changing any of those files:

    python examples/shapes/refresh_model.py [FOLDER]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import training_cli  # noqa: E402

if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "model")
    training_cli.refresh_saved_folder(folder)
    print(f"refreshed {folder} with the code of {ROOT}")
