"""The study: its typed record, create/resume, search space, sensitivity, the ask -> price ->
fine-tune -> tell loop, storage (the only Optuna-internals adapter) and workers."""
