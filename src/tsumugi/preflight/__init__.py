"""Checks run before the expensive work starts: inputs, outputs, model headers, sizes.

A mistake in a path or a file should cost seconds, not a training run: every script calls its
``check_*`` function from :mod:`tsumugi.preflight.runs` before it loads a model or runs a step.
"""
