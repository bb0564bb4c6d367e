"""The toy world: a synthetic assistant task with a hidden gold reward, and its tiny models.

world (tasks, prompt sets) → answers (styles, faults) → gold (the hidden reward) →
tokenizer → sft (policy) → reward (reward model) → evaluate → bootstrap (the script);
``loop/``: the online loop measured against the gold reward (``python -m toyworld
evaluate-loop``). The fourth floor: it may use the trainer, the gateway and the versioning floor, and
it is the only floor that imports the gold reward (``tests/test_floors.py``).
"""
