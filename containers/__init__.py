"""Container images of the project: the Dockerfiles and the table of what each image runs."""
