"""ShieldGemma 2 prompts: the built-in safety policies and one prompt per (image, policy), as transformers builds them.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from ..errors import Gemma3Error
from .prompt import IMAGE_MARK, expand_image_tokens, render_template

# The policies ShieldGemma 2 was trained on (docs/model.md §10), by the names transformers gives them.
DEFAULT_POLICIES = {
    "dangerous": (
        "No Dangerous Content: The image shall not contain content that facilitates or encourages activities that "
        "could cause real-world harm (e.g., building firearms and explosive devices, promotion of terrorism, "
        "instructions for suicide)."
    ),
    "sexual": (
        "No Sexually Explicit content: The image shall not contain content that depicts explicit or graphic sexual "
        "acts (e.g., pornography, erotic nudity, depictions of rape or sexual assault)."
    ),
    "violence": (
        "No Violence/Gore content: The image shall not contain content that depicts shocking, sensational, or "
        "gratuitous violence (e.g., excessive blood and gore, gratuitous violence against animals, extreme injury "
        "or moment of death)."
    ),
}
# The checkpoint's chat template writes the instruction as separate pieces with its own source indentation
# (a newline and 16 spaces) between them; the model reads exactly that text (docs/model.md §10).
TEMPLATE_GAP = "\n" + " " * 16
INSTRUCTION = (
    "You are a policy expert trying to help determine whether a generated or real image is in",
    " violation of the safety policy below. Your decision must very clearly follow the specific",
    " language used in the safety policy and should not include any interpretation outside of the",
    " safety policy.\n\n",
    "<BEGIN_SAFETY_POLICY>\n",
)
QUESTION = (
    "</END_SAFETY_POLICY>\n\n",
    "Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'.",
    "<end_of_turn>\n",
)


def policy_definitions(policies=None, custom_policies=None) -> dict[str, str]:
    """The policies to check, name → text, in order: `policies` (names) among the built-in ones updated with
    `custom_policies` (name → text, which add to or override them); all of them when `policies` is None."""
    custom = dict(custom_policies or {})
    for name, text in custom.items():
        if not isinstance(name, str) or not name or not isinstance(text, str) or not text.strip():
            raise Gemma3Error(f"custom policy {name!r}: give a non-empty name and a non-empty description text")
    known = {**DEFAULT_POLICIES, **custom}
    if policies is None:
        return known
    if isinstance(policies, str) or not all(isinstance(name, str) for name in policies):
        raise Gemma3Error(f"policies must be a list of policy names, got {policies!r:.80}")
    if not policies:
        raise Gemma3Error(f"no policy to check: name at least one of {', '.join(known)}")
    unknown = [name for name in policies if name not in known]
    if unknown:
        raise Gemma3Error(
            f"unknown policy {unknown[0]!r}: the policies are {', '.join(known)} "
            "(define others as custom policies, name → description)"
        )
    return {name: known[name] for name in policies}


def shield_prompt_text(policy_text: str, chat_template: str | None) -> str:
    """The prompt for one image and one policy, its image as one placeholder: the folder's chat template when it
    has one (as transformers' processor renders it), else the text the checkpoint's template writes."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": policy_text}]}]
    if chat_template is not None:
        return render_template(chat_template, messages, add_generation_prompt=False)
    policy = TEMPLATE_GAP.join([*INSTRUCTION, policy_text + "\n", *QUESTION])
    return f"<bos><start_of_turn>user\n{IMAGE_MARK}<start_of_turn>user\n{policy}<start_of_turn>model\n"


def shield_prompt_ids(processor, policy_text: str) -> list[int]:
    """Token ids of one (image, policy) prompt with the image's tokens expanded. Like transformers' processor,
    the tokenizer adds its BOS in front of the template's own, so the prompt starts with two."""
    if processor.tokenizer is None:
        raise Gemma3Error("this model folder has no tokenizer.model: ShieldGemma 2 needs its tokenizer")
    template = processor.chat_template if processor.config.is_shield else None  # a Gemma 3 template is for chats
    text = shield_prompt_text(policy_text, template)
    text = expand_image_tokens(text, [0], processor.config.vision.tokens_per_image)
    return processor.tokenizer.encode(text, add_bos=True)
