"""Versions of what batchgen writes, kept apart from the code that writes it so that the planner
(no torch) and the engine (torch) read the same number.

``ENGINE_VERSION`` names the token streams the engine produces for a given prompt and seed. It
changes whenever a release changes generated text — the sampler's noise, prefill widths, shared
prefills — and is part of every job's fingerprint and done markers, so a resume never mixes the
outputs of two versions without ``--force``.

1: DynamicCache decode, one ``torch.Generator`` per row (batchgen up to the first engine).
2: slot path and Hugging Face path both sampling with counter-based noise g(seed, step, token);
   prefill widths rounded per prompt; n samples forked from one prefill; the job prefix split.
3: a row's text is its own (issue 19): decode attention on the CPU as per-row matmuls (other low
   bits than SDPA, so sampled text may change); mixture-of-experts groups padded; long/dynamic
   RoPE per row, and no job prefix for such models; the Hugging Face path's batches shaped per
   row; logprobs no longer list the end-of-sequence token.
"""

ENGINE_VERSION = 3
