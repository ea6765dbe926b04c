"""The web console: pipelines, executions, steps and model packages in a browser.

`llm-pipeline console` serves a page (static/, plain ES modules: no build step, no CDN) and a
JSON API (api.py) that talks only to the SageMaker, S3 and CloudWatch Logs APIs with the
user's credentials, so the same console shows the local server or an AWS account. server.py
keeps everyone else out: it listens on 127.0.0.1, and answers only requests that carry the
token it printed at start and come from its own origin.
"""
