"""Shell completion scripts (bash, zsh): verbs, actions, and VM names asked of the host (``vm list --names``)."""

from __future__ import annotations

from xapid.client.main import NOUNS, VM_VERBS

_OTHER = "list show"
_TASK = "list show cancel"
_TOP = "top events call completion"

BASH = r"""# bash completion for xapid's client verbs: eval "$(xapid completion bash)"
_xapid_client() {
    local cur=${COMP_WORDS[COMP_CWORD]} noun=${COMP_WORDS[1]} verb=${COMP_WORDS[2]}
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "%(nouns)s %(top)s" -- "$cur")); return
    fi
    case "$noun" in
        vm)
            if [ "$COMP_CWORD" -eq 2 ]; then COMPREPLY=($(compgen -W "%(vm)s" -- "$cur")); return; fi
            if [ "$COMP_CWORD" -eq 3 ] && [ "$verb" != list ]; then
                local kind=""; [ "$verb" = install ] && kind=--templates; [ "$verb" = revert ] && kind=--snapshots
                local IFS=$'\n'
                COMPREPLY=($(compgen -W "$(${COMP_WORDS[0]} vm list $kind --names 2>/dev/null)" -- "$cur"))
                COMPREPLY=("${COMPREPLY[@]// /\\ }")
            fi ;;
        task) [ "$COMP_CWORD" -eq 2 ] && COMPREPLY=($(compgen -W "%(task)s" -- "$cur")) ;;
        vdi|vbd|vif|sr|network|host) [ "$COMP_CWORD" -eq 2 ] && COMPREPLY=($(compgen -W "%(other)s" -- "$cur")) ;;
        top) COMPREPLY=($(compgen -W "--once --json --sort --interval --window" -- "$cur")) ;;
        completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")) ;;
    esac
}
complete -F _xapid_client xapid
"""

ZSH = r"""#compdef xapid
# zsh completion for xapid's client verbs: xapid completion zsh > "${fpath[1]}/_xapid"
_xapid() {
    local -a nouns vm_actions names
    nouns=(%(nouns)s %(top)s)
    vm_actions=(%(vm)s)
    if (( CURRENT == 2 )); then _describe verb nouns; return; fi
    case $words[2] in
        vm)
            if (( CURRENT == 3 )); then _describe action vm_actions; return; fi
            if (( CURRENT == 4 )) && [[ $words[3] != list ]]; then
                local kind=""; [[ $words[3] == install ]] && kind=--templates; [[ $words[3] == revert ]] && kind=--snapshots
                names=("${(@f)$(${words[1]} vm list $kind --names 2>/dev/null)}")
                compadd -a names
            fi ;;
        task) (( CURRENT == 3 )) && compadd %(task)s ;;
        vdi|vbd|vif|sr|network|host) (( CURRENT == 3 )) && compadd %(other)s ;;
        top) compadd -- --once --json --sort --interval --window ;;
        completion) compadd bash zsh ;;
    esac
}
_xapid "$@"
"""


def script(shell: str) -> str:
    values = {"nouns": " ".join(NOUNS), "top": _TOP, "vm": " ".join(VM_VERBS), "task": _TASK, "other": _OTHER}
    return (BASH if shell == "bash" else ZSH) % values
