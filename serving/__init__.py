"""The code inside the serving image: SageMaker's hosting contract for every model the project
registers.

SageMaker starts a hosting container as ``docker run IMAGE serve``; the image's entry point makes
that ``python -m serving serve``, an HTTP server that

  - listens on port 8080 (``SAGEMAKER_BIND_TO_PORT`` when SageMaker names another);
  - loads the model SageMaker extracted from the package's ``ModelDataUrl`` into /opt/ml/model
    (``$SAGEMAKER_BASE_DIR/model``, as SageMaker's inference toolkit reads it), in the background,
    so that ``GET /ping`` answers at once: 503 while loading, 200 once loaded, 500 with the reason
    (also logged on one line) when the model cannot load;
  - answers ``POST /invocations`` in the request formats of SageMaker's LLM containers (TGI, LMI):
    ``{"inputs": "...", "parameters": {...}}`` -> ``[{"generated_text": "..."}]``, and the
    messages API ``{"messages": [...], "max_tokens": N}`` -> a ``chat.completion`` with usage;
    ``"stream": true`` sends server-sent events instead.

Every artifact kind the pipelines register serves (serving.model): a full model (fine-tuned,
pre-trained, distilled), a LoRA adapter (merged at load, or through PEFT), an int8 / nf4 package
of steps.quantize, and prompt-, P- and prefix-tuning adapters, one or several tenants over one
loaded base (serving.tenants). Limits come from environment variables, as SageMaker containers are
configured (serving.settings); every refused request gets a 4xx whose body says on one line what
was wrong and the limit.
"""
