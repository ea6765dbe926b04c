"""Infrastructure as code: the CloudFormation template (generated) and its least-privilege check."""
