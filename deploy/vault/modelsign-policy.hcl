# Vault policy for the signing service's AppRole: sign and verify with one transit key and
# read its public versions, nothing else (no create, rotate, config, export, delete, list).
# deploy/vault/setup.py writes it with your mount and key name in place of "transit" and
# "modelsign-staging". Vault's default policy adds auth/token/lookup-self, which the service's
# health check reads.
#
# Key creation and rotation need more (create on transit/keys/<key>, update on
# transit/keys/<key>/rotate and transit/keys/<key>/config): they are an administrator's job
# with their own token (setup.py creates the key), never the service's.

path "transit/sign/modelsign-staging" {
  capabilities = ["update"]
}

path "transit/verify/modelsign-staging" {
  capabilities = ["update"]
}

path "transit/keys/modelsign-staging" {
  capabilities = ["read"]
}
