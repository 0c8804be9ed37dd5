"""Skill vectors and LoRA adapters as experts; skills exported as LoRA adapters on a VLM.

- :func:`extract_skill` stores an expert's task vector ``tau = theta_E - theta_B`` on its own
  (full, low-rank, BitDelta 1-bit + row scales, or top-k sparse) with a fingerprint of its base.
- :func:`open_expert` reads an EXPERT directory: a checkpoint, a skill or a PEFT LoRA adapter
  (the latter two as task-vector readers, ``holds_deltas = True``).
- :func:`skill_info`, :func:`list_skills`: what a skill is; a folder of skills as a library.
- :func:`export_lora`: a skill as a PEFT LoRA adapter on a VLM's own module names.
"""

from .detect import ThetaView, expert_kind, open_expert
from .export import export_lora
from .extract import FORMATS, ExtractResult, SkillSettings, extract_skill
from .info import format_info, format_list, list_skills, skill_info
from .lora import LoraReader
from .reader import SkillReader

__all__ = [
    "FORMATS",
    "ExtractResult",
    "LoraReader",
    "SkillReader",
    "SkillSettings",
    "ThetaView",
    "expert_kind",
    "export_lora",
    "extract_skill",
    "format_info",
    "format_list",
    "list_skills",
    "open_expert",
    "skill_info",
]
