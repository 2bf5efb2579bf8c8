"""Adds this package's configs to Hydra's search path, so ``+detector=wq_lowfreq`` composes."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class RetrievalHeadsExampleSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="retrieval-heads-example", path="pkg://rh_example.conf")
