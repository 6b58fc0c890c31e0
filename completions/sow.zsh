#compdef sow

_sow_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _SOW_COMPLETE=complete_zsh sow)
}

compdef _sow_completion sow
