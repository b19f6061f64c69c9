"""Imported first by the pipeline's fork server, before the libraries it preloads: the
same quiet console a stage has (`ucai.quiet`), so that their import-time messages are
filtered there as they are in a stage, and the server dies with the pipeline that
started it (`ucai.pipeline.parent_death.die_with_the_pipeline`)."""

from ucai import quiet
from ucai.pipeline.parent_death import die_with_the_pipeline

die_with_the_pipeline()
quiet.install()
