"""Hydra imports the modules under ``hydra_plugins`` when it starts; registering the project's OmegaConf resolvers
here lets its configs compose from Python (Hydra's compose API, a notebook) with no set-up call first."""

from tasks.config import register_resolvers

register_resolvers()
