"""Imported first by the pipeline's fork server, before the libraries it preloads: the
same quiet console a stage has (`ucai.quiet`), so that their import-time messages are
filtered there as they are in a stage."""

from ucai import quiet

quiet.install()
