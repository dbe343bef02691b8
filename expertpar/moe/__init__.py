"""Sparse mixture-of-experts: router, dispatch/combine, experts, losses, layer, backends."""
from .backend import LocalBackend, MoEBackend
from .layer import MoELayer, MoEOutput, RouteContext
from .router import IMAGE, TEXT, Routing, expert_capacity, route
from .stats import RoutingStats

__all__ = ["LocalBackend", "MoEBackend", "MoELayer", "MoEOutput", "RouteContext", "IMAGE",
           "TEXT", "Routing", "expert_capacity", "route", "RoutingStats"]
