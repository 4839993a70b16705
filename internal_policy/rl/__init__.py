"""Reinforcement learning: sampling responses (``generation``), scoring them (``rewards``), the clipped objective
(``losses``) and the GRPO / BuPO trainer (``trainer`` with its ``rollout``, ``update`` and ``checkpoint`` parts)."""
