"""Sparse mixture-of-experts: router, dispatch/combine, experts, losses, layer, backends."""
from .backend import LocalBackend, MoEBackend
from .layer import MoELayer, MoEOutput, RouteContext
from .router import (IMAGE, POLICIES, TEXT, Routing, expert_capacity, expert_choice,
                     expert_choice_capacity, route, token_choice)
from .stats import RoutingStats

__all__ = ["LocalBackend", "MoEBackend", "MoELayer", "MoEOutput", "RouteContext", "IMAGE",
           "POLICIES", "TEXT", "Routing", "expert_capacity", "expert_choice",
           "expert_choice_capacity", "route", "token_choice", "RoutingStats"]
