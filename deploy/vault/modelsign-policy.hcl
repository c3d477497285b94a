# Vault policy for the signing service's AppRole (web and worker): sign and verify with one
# transit key and read its public versions, nothing else (no create, rotate, config, export,
# delete, list).
# deploy/vault/setup.py writes it with your mount and key name in place of "transit" and
# "modelsign-staging". Vault's default policy adds auth/token/lookup-self, which the service's
# health check reads.
#
# Key creation and rotation are the key ceremonies' job, with a credential of their own that
# the worker never holds: modelsign-ceremony-policy.hcl.

path "transit/sign/modelsign-staging" {
  capabilities = ["update"]
}

path "transit/verify/modelsign-staging" {
  capabilities = ["update"]
}

path "transit/keys/modelsign-staging" {
  capabilities = ["read"]
}
