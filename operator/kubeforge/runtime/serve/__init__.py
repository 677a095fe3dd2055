"""Serving data plane of InferenceDeployment: the reference engine, the prefill/decode router, discovery,
metrics and the per-pool autoscaling policy.

    python -m kubeforge.runtime.serve.engine  ...   OpenAI-compatible engine on transformers (P/D capable)
    python -m kubeforge.runtime.serve.router  ...   vLLM-protocol prefill/decode router
    python -m kubeforge.runtime.serve.echo    ...   a trivial engine stand-in (router benchmarks and tests)
"""
