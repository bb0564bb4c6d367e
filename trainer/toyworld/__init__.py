"""The toy world: a synthetic assistant task with a hidden gold reward, and its tiny models.

world (tasks, prompt sets) → answers (styles, faults) → gold (the hidden reward) →
tokenizer → sft (policy) → reward (reward model) → evaluate → bootstrap (the script).
"""
