"""Learning from use: record deployed traffic as sessions, take users' feedback, train on it
offline, and canary the new version with automatic promotion or rollback (DESIGN.md,
"Learning from use")."""
