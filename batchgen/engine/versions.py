"""Versions of what batchgen writes, kept apart from the code that writes it so that the planner
(no torch) and the engine (torch) read the same number.

``ENGINE_VERSION`` names the token streams the engine produces for a given prompt and seed. It
changes whenever a release changes generated text — the sampler's noise, prefill widths, shared
prefills — and is part of every job's fingerprint and done markers, so a resume never mixes the
outputs of two versions without ``--force``.

1: DynamicCache decode, one ``torch.Generator`` per row (batchgen up to the first engine).
2: slot path and Hugging Face path both sampling with counter-based noise g(seed, step, token);
   prefill widths rounded per prompt; n samples forked from one prefill; the job prefix split.
"""

ENGINE_VERSION = 2
