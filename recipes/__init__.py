"""The papers' settings as data, never imported by a method file: recipes/<method>.py holds a method's paper recipes
(`--recipe NAME`, read by common.parse_args only when a run names one), recipes/datasets.py the system prompts and
the dataset and benchmark presets (read by data.load_preset only when a run names one), recipes/dry_run.py the
model shapes and the `--dry-run` printout with its memory estimate. A method file keeps its Args, its presets and
the small `embedded` recipe of the CPU demo."""


def dataset_presets():
    """Every dataset preset: recipes/datasets.py's and the method-specific ones (CHORD's filtered OpenR1 sets)."""
    from recipes import chord
    from recipes.datasets import DATASETS
    return {**DATASETS, **chord.DATASETS}
