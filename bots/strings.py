"""Every sentence the bots say, in one catalogue per language (English first; others fall back to it)."""

from __future__ import annotations

STRINGS: dict[str, dict[str, str]] = {
    "en": {
        "help": (
            "Send a selfie with /toon and get yourself back as a toon.\n"
            "/toon [style] [blend] [instant|fast|balanced|quality] (attach a photo, or reply to one)\n"
            "instant: the style's trained instant model, no wait; the default where the blend has one\n"
            "/blend <4-256>: re-draw your last toon with another blend (small = more toon)\n"
            "/blend vote: let this community vote on its favourite blend (admins)\n"
            "/blend vote snapshots <style>: let it pick one of a fine-tune's snapshots (admins)\n"
            "/edit <direction> <strength>: change your last toon along a named direction, e.g. /edit smile 2; "
            "/edit alone lists them\n"
            "/sweep [style]: your last toon at every blend level, as an animation\n"
            "/style <name>: your default style; /styles lists them\n"
            "/cancel: stop your running job; /forget: delete everything of yours\n"
            "Admins: /finetune <name> (attach a .zip of images), /publish <name>, /poll close,\n"
            "/distill [style] [blend]: train the instant model for a style and blend"
        ),
        "help_discord": (
            "Send a selfie with /toon and get yourself back as a toon.\n"
            "/toon image [style] [blend] [mode]: attach a photo (mode: instant, fast, balanced or quality)\n"
            "instant: the style's trained instant model, no wait; the default where the blend has one\n"
            "/blend <4-256>: re-draw your last toon with another blend (small = more toon)\n"
            "/blendvote [levels]: let this server vote on its favourite blend (admins)\n"
            "/blendvote snapshots:True style:<name>: let it pick one of a fine-tune's snapshots (admins)\n"
            "/edit <direction> <strength>: change your last toon along a named direction, e.g. /edit smile 2\n"
            "/sweep [style]: your last toon at every blend level, as an animation\n"
            "/style <name>: your default style; /styles lists them\n"
            "/cancel: stop your running job; /forget: delete everything of yours\n"
            "Admins: /finetune <name> with a .zip of images, /publish <name>, /pollclose,\n"
            "/distill [style] [blend]: train the instant model for a style and blend"
        ),
        "need_photo": "Attach a photo to /toon (or reply /toon to a photo).",
        "too_big": "That file is {size} MB; the limit here is {limit} MB. Send a smaller photo.",
        "queued": "Queued. {ahead} ahead of you, about {eta} to go.",
        "queued_next": "Queued: you're next.",
        "starting": "Starting…",
        "stage_load": "Warming up the models…",
        "stage_align": "Finding faces…",
        "stage_project": "Learning your face… {bar} {step}/{total}",
        "stage_render": "Drawing your toon…",
        "stage_paste": "Putting it back in your photo…",
        "stage_upload": "Almost there…",
        "stage_finetune": "Training the style… {bar} {step}/{total}",
        "stage_distill": "Training the instant model… {bar} {step}/{total}",
        "stage_reproject": (
            "Your last toon was instant, which keeps no latents: learning your face first… {bar} {step}/{total}"
        ),
        "stage_edit": "Editing your toon…",
        "stage_sweep": "Drawing every blend level…",
        "edited": ", edited: {edits}",
        "edit_usage": (
            "Use /edit followed by a direction and a strength, e.g. /edit smile 2 (negative goes the other way, "
            "0 takes it out). Named directions of {style}: {names}."
        ),
        "edit_no_directions": (
            "The style {style} has no named directions yet, so there is nothing to /edit. An admin makes them with "
            "`toonify directions {style} --register` and names the ones worth keeping."
        ),
        "sweep_done": "Your toon at every blend level of {style}: {levels} px.",
        "sweep_done_probe": "No toon of yours yet: the probe faces at every blend level of {style}: {levels} px.",
        "finetune_snapshot": "Snapshot at step {step}/{total}: {line}",
        "finetune_metrics": "Last snapshot: {line}",
        "done": "Here you are ({style}, blend {blend}{how}). Try another blend below.",
        "done_faces": "Here you are: {faces} faces ({style}, blend {blend}{how}).",
        "mode_instant": ", instant",
        "too_small_note": " {n} face(s) were too small to use.",
        "delivered": "Done.",
        "failed": "Sorry, that didn't work: {error}",
        "cancelled": "Cancelled.",
        "restarting": "I'm restarting: try again in a minute.",
        "cancel_none": "You have nothing running.",
        "cancel_ok": "Stopping your job…",
        "already": "You already sent this one; here's where it stands.",
        "blend_usage": "Use /blend followed by a number such as 8, 16 or 32 (or /blend vote).",
        "style_set": "Your default style is now {style}.",
        "style_usage": "Use /style followed by a style name. /styles lists them.",
        "styles": "Styles here: {names}",
        "no_styles": "There are no styles here yet.",
        "forgot": "Done: I deleted {jobs} job(s), {files} file(s) and {votes} vote(s) of yours.",
        "poll": "Vote for this community's {style} blend! Rows top to bottom: {labels}. Closes {closes}.",
        "poll_snapshots": (
            "Which snapshot of {style} should this community keep? Rows top to bottom: {labels}. Closes {closes}."
        ),
        "poll_snapshot_won": "'{style}' uses that snapshot from now on.",
        "poll_tally": "Votes: {tally}",
        "poll_closed": "The poll is closed. Winner: {winner}.",
        "poll_closed_none": "The poll is closed without votes; nothing changed.",
        "vote_ok": "Your vote: option {position}.",
        "poll_close_usage": "Use /poll close (closes this community's latest open poll).",
        "no_open_poll": "There is no open poll here.",
        "finetune_usage": "Use /finetune <name> with a .zip of 8 or more images attached.",
        "finetune_queued": "Fine-tuning '{name}' is queued. I'll post progress here.",
        "finetune_done": "'{name}' is trained ({images} images, {steps} steps). Publish it with /publish {name}.",
        "published": "'{name}' is published: everyone here can use /toon {name}.",
        "distill_queued": "Training an instant model is queued. I'll post progress here.",
        "distill_auto": "Training an instant model for it now: toons with it will need no waiting.",
        "distill_already": "That instant model is already being trained; here's where it stands.",
        "distill_done": "'{style}' has an instant model for blend {blend} now: those toons need no waiting.",
        "unknown": "I don't know that command. /help lists what I can do.",
        "error": "Something went wrong on my side. Please try again in a minute.",
        "button_blend": "Blend {level}",
        "button_cancel": "Cancel",
        "button_vote": "Vote {position}",
        "button_edit": "{edit}",
        # Command menus (Telegram's setMyCommands, Discord's command descriptions).
        "cmd_toon": "Turn a photo into a toon (attach it, or reply to it)",
        "cmd_blend": "Re-draw your last toon with another blend, or /blend vote",
        "cmd_blend_discord": "Re-draw your last toon with another blend",
        "cmd_toon_discord": "Turn a photo into a toon",
        "cmd_style": "Set your default style",
        "cmd_styles": "List the styles here",
        "cmd_cancel": "Stop your running job",
        "cmd_forget": "Delete everything I keep about you",
        "cmd_help": "What I can do",
        "cmd_finetune": "Admins: train a style from a .zip of images",
        "cmd_publish": "Admins: publish a trained style",
        "cmd_distill": "Admins: train a style's instant model for a blend",
        "cmd_poll": "Admins: /poll close ends the blend vote",
        "cmd_blendvote": "Admins: let this server vote on its favourite blend",
        "cmd_pollclose": "Admins: close this server's blend vote",
        "cmd_edit": "Change your last toon along a named direction (/edit smile 2)",
        "cmd_sweep": "Your last toon at every blend level, as an animation",
    },
}


def t(key: str, locale: str | None = None, **kw: object) -> str:
    """The sentence ``key`` in ``locale`` (e.g. 'de' or 'pt-BR'; English when missing), formatted with ``kw``."""
    lang = (locale or "en").split("-")[0].split("_")[0].lower()
    text = STRINGS.get(lang, {}).get(key) or STRINGS["en"][key]
    return text.format(**kw) if kw else text
