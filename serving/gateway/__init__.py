"""The routing gateway: an OpenAI-compatible front of vLLM where model "auto" routes a screenshot."""
