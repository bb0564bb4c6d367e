"""The serving gateway: OpenAI-compatible chat completions with best-of-N reward reranking.

Built in the issue 'Best-of-N serving on real vLLM'; this package is its home.
"""
