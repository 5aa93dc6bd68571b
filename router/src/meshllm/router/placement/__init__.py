"""Model placement: the catalog, the pure placement plan, and the control that carries it out."""

from meshllm.router.placement import plan
from meshllm.router.placement.catalog import CatalogModel, parse_catalog

__all__ = ["CatalogModel", "parse_catalog", "plan"]
