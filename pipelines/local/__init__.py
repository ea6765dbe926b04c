"""The local engine: runs a SageMaker pipeline definition JSON on this machine, without Docker."""
